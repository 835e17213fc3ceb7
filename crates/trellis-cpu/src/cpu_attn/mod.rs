//! `CPU_ATTN`: paged attention with SIMD kernels, online softmax and the compute pool (vLLM's
//! name for its CPU backend).
//!
//! # Layout
//!
//! Each layer owns a K and a V cache, `num_blocks` blocks of `num_kv_heads` heads each. Inside
//! a block, one head's `block_size` values are a `[block_size, head_dim]` matrix (rows
//! contiguous) and its keys a `[head_dim, block_size]` matrix (keys stored transposed, so that
//! 16 consecutive positions of one dimension are one vector load): a sequence's keys and
//! values are read in place, a block at a time, straight from the block table (no gather, no
//! copy). The element type is the [`KvCacheSpec::dtype`]: `F32`, `F16` or `BF16`. New keys and
//! values arrive in f32 and are rounded to nearest even when stored; they are widened back to
//! f32 as they are read. Queries, scores, accumulators and outputs are f32.
//!
//! # Algorithm
//!
//! [`AttentionImpl::forward`] first checks the whole step (shapes, slots, block tables), then
//! writes every new key and value into its slot in one pass (sequences of a step may share
//! prefix blocks, so all writes come before any read), then attends. Attention is the
//! flash-attention recurrence: one pass over the context in tiles of [`TILE`] positions,
//! keeping per query head a running maximum `m`, a running sum `l` and an unnormalised f32
//! output; when a tile raises the maximum, the sum and the output are rescaled by
//! `exp(m_old - m_new)`. The query heads of one GQA group (and, in prefill, a few query rows)
//! form the *lanes* that share each key and value row, at most [`MAX_LANES`] (or one row's
//! group, if larger). Causality is per lane: a lane of the `i`-th new token sees
//! `context_len - query_len + i + 1` positions; the weights of positions it does not see are
//! zero, and lanes that see none of a tile skip it.
//!
//! Per tile, like a small GEMM: the scores of a block of up to 8 lanes against the tile's 32
//! keys are accumulated in registers (per dimension, one load of 16 keys and one broadcast of
//! each lane's query element; no horizontal sums), then per lane the tile maximum, the rescale
//! factor and `exp` (a vectorised polynomial, within a few f32 ulps), then the weighted value
//! rows added into blocks of up to 4 lanes' accumulators, rescaled as they are loaded and held
//! in registers across the tile's rows. With f16/bf16 caches the kernels widen keys and values
//! as they load them, or, when more than [`WIDEN_LANES`] lanes share the tile (prefill), the
//! tile is widened once into f32 scratch first.
//!
//! The context is also cut into chunks of [`CHUNK`] positions counted from position 0: at
//! each chunk boundary a lane's `(m, l, output)` is folded into its running result (rescaled to
//! the larger maximum) and restarted. A long context of a short lane set (a decode) can thus be
//! split into one work item per chunk, run in parallel, each writing its chunk's state, then
//! merged by the same fold in chunk order (flash-decoding): the split changes which thread
//! computes a chunk, never the arithmetic.
//!
//! # Batch invariance
//!
//! A row's result depends only on its query, its sequence's visible keys and values and the
//! constants above: every score is one chain of multiply-adds over the head dimension whatever
//! lanes share its block, every output element one chain over the tile's rows (zero weights
//! of invisible positions add exactly nothing), tiles and chunks start at fixed multiples of
//! [`TILE`] and [`CHUNK`], and the merge order is fixed. So the grouping of lanes into sets
//! and blocks, the other sequences of the step, the number of threads and the decode split do
//! not change a single bit of it (tests pin this).
//!
//! # SIMD and threads
//!
//! The kernels (scores, value accumulation, max, exp, f16/bf16 widening) have AVX-512
//! (F/BW/VL), AVX2 (with FMA and F16C) and scalar versions, chosen at run time with
//! [`trellis_kernels::cpu::isa`] (`TRELLIS_ISA=avx2|scalar` caps it for comparisons); the
//! binary itself assumes only SSE2. Each version of the per-lane-set loop is compiled inside
//! a `#[target_feature]` function so the kernels inline into it. The work items are
//! (sequence, KV head, tile of up to [`ROW_TILE`] query rows), or one chunk of such a lane
//! set of at most [`SPLIT_ROWS`] rows when a step has fewer than [`SPLIT_ITEMS_PER_THREAD`]
//! items per thread, run on [`trellis_kernels::pool::global`] (steps under [`SERIAL_WORK`]
//! run on the calling thread), then the merges of split lane sets; every item writes a
//! disjoint set of output rows or chunk states (the step is checked first: sequences may not
//! overlap in the batch). Each thread keeps its scratch (queries, accumulators, scores, a tile
//! of widened rows) in a thread-local vector, so a call allocates only its output (the
//! work-item lists and chunk states keep their capacity in the layer).
//!
//! # Speed
//!
//! `cargo run --release -p trellis-cpu --example attn_bench` reports prefill (a 512-token
//! prompt) and decode time per layer against `CPU_REFERENCE` for the default model's shape.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, StorageRef, Tensor, bail};
use trellis_kernels::cpu::Isa;
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionMetadata, AttentionShape, KvCacheSpec,
    SeqAttentionMetadata,
};

/// The registry name of this backend.
pub const CPU_ATTN: &str = "CPU_ATTN";

/// Context positions scored together before the softmax state is updated.
pub const TILE: usize = 32;

/// Most lanes (query head × query row pairs) that share one pass over the context, unless one
/// row's GQA group alone is larger.
pub const MAX_LANES: usize = 24;

/// Multiply-adds (`query rows × context × heads × head size`, summed over the step) below
/// which a step runs on the calling thread instead of the compute pool.
pub const SERIAL_WORK: usize = 1 << 16;

/// Most query rows in one work item: long prefills are split into tiles of this many rows.
pub const ROW_TILE: usize = 32;

/// Context positions of one chunk: every lane's softmax state is folded into its result at
/// each multiple of `CHUNK` (counted from position 0), so a long context can be split into
/// chunks computed in parallel and merged in the same order with the same arithmetic.
pub const CHUNK: usize = 128;

/// Lane sets of at most this many rows are split into chunk items when a step has fewer than
/// [`SPLIT_ITEMS_PER_THREAD`] items per thread (decode of one or a few sequences).
pub const SPLIT_ROWS: usize = 4;

/// Below this many work items per pool thread, short lane sets are split into chunks.
pub const SPLIT_ITEMS_PER_THREAD: usize = 4;

/// With more lanes than this attending a tile, f16/bf16 key and value rows are widened into an
/// f32 tile once; with fewer, the kernels widen them as they load them.
pub const WIDEN_LANES: usize = 8;

/// The `CPU_ATTN` attention backend: paged K/V in blocks, f32/f16/bf16 cache, SIMD kernels.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuAttnBackend;

/// Returns the `CPU_ATTN` backend as a shareable trait object.
pub fn cpu_attn_backend() -> Arc<dyn AttentionBackend> {
    Arc::new(CpuAttnBackend)
}

impl AttentionBackend for CpuAttnBackend {
    fn name(&self) -> &str {
        CPU_ATTN
    }

    fn supported_kv_cache_dtypes(&self) -> Vec<DType> {
        vec![DType::F32, DType::F16, DType::BF16]
    }

    fn new_layer(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> Result<Box<dyn AttentionImpl>> {
        Ok(Box::new(CpuAttnAttention::new(spec, shape, device)?))
    }
}

/// One cache (K or V) in its storage type; f16 and bf16 are kept as their bit patterns.
#[derive(Debug, Clone)]
enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Bf16(Vec<u16>),
}

impl KvBuf {
    fn zeros(dtype: DType, len: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => KvBuf::F32(vec![0.0; len]),
            DType::F16 => KvBuf::F16(vec![0; len]),
            DType::BF16 => KvBuf::Bf16(vec![0; len]),
            other => bail!("{CPU_ATTN}: KV cache dtype must be F32, F16 or BF16, got {other:?}"),
        })
    }

    /// Stores `src[i]` at `off + i * stride`, rounding to nearest even for f16/bf16 (a run of
    /// values converted at once, with F16C where the CPU has it, then stored).
    fn write(&mut self, off: usize, stride: usize, src: &[f32]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        const RUN: usize = 64;
        let mut bits = [0u16; RUN];
        let store = |c: &mut [u16], base: usize, bits: &[u16]| {
            if stride == 1 {
                c[off + base..][..bits.len()].copy_from_slice(bits);
            } else {
                for (i, &b) in bits.iter().enumerate() {
                    c[off + (base + i) * stride] = b;
                }
            }
        };
        match self {
            KvBuf::F32(c) => {
                for (i, &x) in src.iter().enumerate() {
                    c[off + i * stride] = x;
                }
            }
            KvBuf::F16(c) => {
                for (n, run) in src.chunks(RUN).enumerate() {
                    let h = &mut bits[..run.len()];
                    h.reinterpret_cast_mut::<half::f16>()
                        .convert_from_f32_slice(run);
                    store(c, n * RUN, h);
                }
            }
            KvBuf::Bf16(c) => {
                for (n, run) in src.chunks(RUN).enumerate() {
                    let h = &mut bits[..run.len()];
                    h.reinterpret_cast_mut::<half::bf16>()
                        .convert_from_f32_slice(run);
                    store(c, n * RUN, h);
                }
            }
        }
    }

    fn view(&self) -> KvView<'_> {
        match self {
            KvBuf::F32(c) => KvView::F32(c),
            KvBuf::F16(c) => KvView::F16(c),
            KvBuf::Bf16(c) => KvView::Bf16(c),
        }
    }
}

/// A borrowed cache, read by the attention items.
#[derive(Clone, Copy)]
enum KvView<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

/// One layer of `CPU_ATTN` attention with its K and V caches.
#[derive(Debug, Clone)]
pub struct CpuAttnAttention {
    shape: AttentionShape,
    block_size: usize,
    num_blocks: usize,
    /// `[num_blocks, num_kv_heads, head_dim, block_size]` (keys transposed in each block).
    k_cache: KvBuf,
    /// `[num_blocks, num_kv_heads, block_size, head_dim]`.
    v_cache: KvBuf,
    /// The work items of the last call, kept for their capacity.
    items: Vec<WorkItem>,
    /// The merges of split lane sets of the last call, kept for their capacity.
    merges: Vec<MergeItem>,
    /// Chunk states of split lane sets, kept for its capacity.
    partials: Vec<f32>,
}

/// (sequence, KV head, query rows, whole context or one chunk) run by one pool item.
#[derive(Debug, Clone, Copy)]
struct WorkItem {
    seq: usize,
    kv_head: usize,
    row0: usize,
    rows: usize,
    /// `Some((chunk, offset of its state in the partials))` for a split lane set.
    chunk: Option<(usize, usize)>,
}

/// The merge of a split lane set: its `chunks` states from `partial` on, in chunk order.
#[derive(Debug, Clone, Copy)]
struct MergeItem {
    seq: usize,
    kv_head: usize,
    row0: usize,
    rows: usize,
    partial: usize,
    chunks: usize,
}

impl CpuAttnAttention {
    /// Allocates the zeroed K and V caches described by `spec` for a layer of shape `shape`.
    pub fn new(spec: &KvCacheSpec, shape: AttentionShape, device: &Device) -> Result<Self> {
        if !device.is_cpu() {
            bail!("{CPU_ATTN}: runs on the CPU only, got device {device:?}");
        }
        if spec.block_size == 0 {
            bail!("{CPU_ATTN}: block size must be positive");
        }
        if shape.head_dim == 0 {
            bail!("{CPU_ATTN}: head size must be positive");
        }
        if shape.num_kv_heads == 0 || !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
            bail!(
                "{CPU_ATTN}: {} query heads are not a multiple of {} KV heads",
                shape.num_heads,
                shape.num_kv_heads
            );
        }
        if spec.num_kv_heads != shape.num_kv_heads || spec.head_dim != shape.head_dim {
            bail!("{CPU_ATTN}: KV cache spec {spec:?} does not match attention shape {shape:?}");
        }
        let len = spec
            .num_blocks
            .checked_mul(spec.block_size * spec.num_kv_heads * spec.head_dim)
            .ok_or_else(|| candle_core::Error::Msg(format!("{CPU_ATTN}: {spec:?} is too large")))?;
        Ok(Self {
            shape,
            block_size: spec.block_size,
            num_blocks: spec.num_blocks,
            k_cache: KvBuf::zeros(spec.dtype, len)?,
            v_cache: KvBuf::zeros(spec.dtype, len)?,
            items: Vec::new(),
            merges: Vec::new(),
            partials: Vec::new(),
        })
    }

    /// The element type of the K and V caches.
    pub fn kv_cache_dtype(&self) -> DType {
        match self.k_cache {
            KvBuf::F32(_) => DType::F32,
            KvBuf::F16(_) => DType::F16,
            KvBuf::Bf16(_) => DType::BF16,
        }
    }

    /// Checks every sequence of `metadata` against a batch of `num_tokens` tokens, so that the
    /// parallel part cannot index out of range or write an output row twice.
    fn check_seqs(&self, metadata: &AttentionMetadata, num_tokens: usize) -> Result<()> {
        let bs = self.block_size;
        let mut prev_end = 0;
        for seq in &metadata.seqs {
            let end = seq.query_start.checked_add(seq.query_len);
            if end.is_none_or(|e| e > num_tokens) || seq.query_len > seq.context_len {
                bail!("{CPU_ATTN}: sequence {seq:?} does not fit a batch of {num_tokens} tokens");
            }
            if seq.query_len > 0 && seq.query_start < prev_end {
                bail!("{CPU_ATTN}: sequences overlap in the batch or are not in batch order");
            }
            prev_end = end.unwrap_or(prev_end).max(prev_end);
            let blocks = seq.context_len.div_ceil(bs);
            if seq.block_table.len() < blocks {
                bail!(
                    "{CPU_ATTN}: block table of {} blocks is too short for {} tokens",
                    seq.block_table.len(),
                    seq.context_len
                );
            }
            if let Some(b) = seq.block_table[..blocks]
                .iter()
                .find(|&&b| b as usize >= self.num_blocks)
            {
                bail!(
                    "{CPU_ATTN}: block {b} out of range ({} blocks)",
                    self.num_blocks
                );
            }
        }
        Ok(())
    }
}

/// f32 contents of a `[tokens, heads, head_dim]` tensor: borrowed when it is a contiguous f32
/// CPU tensor, else copied.
enum F32Data<'a> {
    Borrowed(StorageRef<'a>, &'a Layout),
    Owned(Vec<f32>),
}

impl<'a> F32Data<'a> {
    fn of(t: &'a Tensor, what: &str, dims: [usize; 3]) -> Result<Self> {
        if t.dims() != dims {
            bail!(
                "{CPU_ATTN}: {what} has shape {:?}, expected {dims:?}",
                t.dims()
            );
        }
        if t.dtype() == DType::F32 && t.layout().is_contiguous() {
            let (storage, layout) = t.storage_and_layout();
            if matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
                return Ok(F32Data::Borrowed(storage, layout));
            }
        }
        Ok(F32Data::Owned(
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        ))
    }

    fn slice(&self) -> &[f32] {
        match self {
            F32Data::Borrowed(storage, layout) => match (&**storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => &v[start..end],
                _ => &[],
            },
            F32Data::Owned(v) => v,
        }
    }
}

/// The output buffer, shared by the pool items, each writing its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: items write disjoint regions of the buffer (checked by `check_seqs`: sequences do not
// overlap, and within a sequence every (query row, KV head) pair belongs to exactly one item);
// the buffer outlives the parallel loop.
unsafe impl Sync for OutPtr {}
// SAFETY: as for `Sync`: the pointer is only a base address for disjoint writes.
unsafe impl Send for OutPtr {}

/// What every item of one call reads.
struct Step<'a> {
    q: &'a [f32],
    k: KvView<'a>,
    v: KvView<'a>,
    out: OutPtr,
    out_len: usize,
    /// Chunk states of split lane sets.
    partials: OutPtr,
    shape: AttentionShape,
    block_size: usize,
}

/// One pass over a sequence's context for `rows` consecutive query rows of one KV head.
struct LaneSet<'a> {
    step: &'a Step<'a>,
    seq: &'a SeqAttentionMetadata,
    kv_head: usize,
    /// Index (within the sequence's new tokens) of the first row.
    row0: usize,
    rows: usize,
    /// What the pass covers and where its result goes.
    target: Target,
}

/// What a lane set computes and where it writes it.
#[derive(Clone, Copy)]
enum Target {
    /// The whole visible context; normalised rows into the output.
    Output,
    /// Positions `chunk * CHUNK ..` up to the next multiple of [`CHUNK`]; the raw state
    /// (`m`, `l`, then the unnormalised output, per lane) at `partial`.
    Chunk { chunk: usize, partial: OutPtr },
}

impl AttentionImpl for CpuAttnAttention {
    fn forward(
        &mut self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        metadata: &AttentionMetadata,
    ) -> Result<Tensor> {
        let shape = self.shape;
        let (h, hkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let num_tokens = metadata.num_tokens();
        let q = F32Data::of(query, "query", [num_tokens, h, d])?;
        let k = F32Data::of(key, "key", [num_tokens, hkv, d])?;
        let v = F32Data::of(value, "value", [num_tokens, hkv, d])?;
        let (q, k, v) = (q.slice(), k.slice(), v.slice());
        if q.len() != num_tokens * h * d || k.len() != num_tokens * hkv * d || k.len() != v.len() {
            bail!("{CPU_ATTN}: query, key or value is not readable as contiguous f32");
        }
        let bs = self.block_size;
        if metadata.block_size != bs {
            bail!(
                "{CPU_ATTN}: metadata block size {} != cache block size {bs}",
                metadata.block_size
            );
        }
        let num_slots = self.num_blocks * bs;
        if let Some(slot) = metadata.slot_mapping.iter().find(|&&s| s >= num_slots) {
            bail!("{CPU_ATTN}: slot {slot} out of range ({num_slots} slots)");
        }
        self.check_seqs(metadata, num_tokens)?;

        // 1. Write every new key and value into its slot.
        for (t, &slot) in metadata.slot_mapping.iter().enumerate() {
            let (block, off) = (slot / bs, slot % bs);
            for kh in 0..hkv {
                let head = (block * hkv + kh) * bs * d;
                let src = (t * hkv + kh) * d;
                self.k_cache.write(head + off, bs, &k[src..src + d]);
                self.v_cache.write(head + off * d, 1, &v[src..src + d]);
            }
        }

        // 2. Attention, in parallel over (sequence, KV head, row tile), long contexts of
        //    short lane sets split in chunks when there are too few items to balance.
        let pool = trellis_kernels::pool::global();
        let group = h / hkv;
        let unsplit: usize = metadata
            .seqs
            .iter()
            .map(|s| s.query_len.div_ceil(ROW_TILE) * hkv)
            .sum();
        let split = pool.threads() > 1 && unsplit < SPLIT_ITEMS_PER_THREAD * pool.threads();
        let mut items = std::mem::take(&mut self.items);
        let mut merges = std::mem::take(&mut self.merges);
        let mut partials = std::mem::take(&mut self.partials);
        items.clear();
        merges.clear();
        let mut part_len = 0;
        for (s, seq) in metadata.seqs.iter().enumerate() {
            // Longest tiles (the last rows) first, for balance.
            let tiles = seq.query_len.div_ceil(ROW_TILE);
            for tile in (0..tiles).rev() {
                let row0 = tile * ROW_TILE;
                let rows = ROW_TILE.min(seq.query_len - row0);
                let end = seq.context_len - seq.query_len + row0 + rows;
                let chunks = end.div_ceil(CHUNK);
                for kv_head in 0..hkv {
                    let item = WorkItem {
                        seq: s,
                        kv_head,
                        row0,
                        rows,
                        chunk: None,
                    };
                    if !(split && rows <= SPLIT_ROWS && chunks > 1) {
                        items.push(item);
                        continue;
                    }
                    let stride = rows * group * (d + 2);
                    merges.push(MergeItem {
                        seq: s,
                        kv_head,
                        row0,
                        rows,
                        partial: part_len,
                        chunks,
                    });
                    items.extend((0..chunks).map(|c| WorkItem {
                        chunk: Some((c, part_len + c * stride)),
                        ..item
                    }));
                    part_len += chunks * stride;
                }
            }
        }
        partials.clear();
        partials.resize(part_len, 0.0);
        let mut out = vec![0f32; num_tokens * h * d];
        let step = Step {
            q,
            k: self.k_cache.view(),
            v: self.v_cache.view(),
            out: OutPtr(out.as_mut_ptr()),
            out_len: out.len(),
            partials: OutPtr(partials.as_mut_ptr()),
            shape,
            block_size: bs,
        };
        let isa = trellis_kernels::cpu::isa();
        let rows_per_set = (MAX_LANES / group).max(1);
        let run_item = |i: usize| {
            let it = items[i];
            let seq = &metadata.seqs[it.seq];
            let mut r = 0;
            while r < it.rows {
                // A split lane set is never cut further (its partial region is laid out
                // for all its rows).
                let rows = match it.chunk {
                    Some(_) => it.rows,
                    None => rows_per_set.min(it.rows - r),
                };
                let target = match it.chunk {
                    Some((chunk, off)) => Target::Chunk {
                        chunk,
                        // SAFETY: `off` is inside the partials (laid out above).
                        partial: OutPtr(unsafe { step.partials.0.add(off) }),
                    },
                    None => Target::Output,
                };
                let set = LaneSet {
                    step: &step,
                    seq,
                    kv_head: it.kv_head,
                    row0: it.row0 + r,
                    rows,
                    target,
                };
                run_lane_set(isa, &set);
                r += rows;
            }
        };
        let run_merge = |i: usize| {
            let it = merges[i];
            merge_chunks(&step, &metadata.seqs[it.seq], &it);
        };
        // Steps too small to repay waking the pool's workers run on this thread.
        let work: usize = metadata
            .seqs
            .iter()
            .map(|s| s.query_len.saturating_mul(s.context_len))
            .fold(0, usize::saturating_add)
            .saturating_mul(h * d);
        if work < SERIAL_WORK {
            (0..items.len()).for_each(run_item);
            (0..merges.len()).for_each(run_merge);
        } else {
            pool.run(items.len(), run_item);
            // Merges are light (a few multiply-adds per chunk and output element): small ones
            // are not worth waking the workers again.
            if part_len < SERIAL_WORK {
                (0..merges.len()).for_each(run_merge);
            } else {
                pool.run(merges.len(), run_merge);
            }
        }
        self.items = items;
        self.merges = merges;
        self.partials = partials;
        Tensor::from_vec(out, (num_tokens, h, d), query.device())
    }
}

thread_local! {
    /// Per-thread scratch of the attention items, grown to the largest need and kept.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs one lane set with the best kernels `isa` allows.
fn run_lane_set(isa: Isa, set: &LaneSet<'_>) {
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        match (set.step.k, set.step.v) {
            (KvView::F32(k), KvView::F32(v)) => run_typed::<F32E>(isa, set, k, v, &mut scratch),
            (KvView::F16(k), KvView::F16(v)) => run_typed::<F16E>(isa, set, k, v, &mut scratch),
            (KvView::Bf16(k), KvView::Bf16(v)) => run_typed::<Bf16E>(isa, set, k, v, &mut scratch),
            // K and V are allocated with one dtype.
            _ => unreachable!("{CPU_ATTN}: K and V caches differ in dtype"),
        }
    });
}

/// [`run_lane_set`] for caches of element type `E`.
fn run_typed<E: Elem>(isa: Isa, set: &LaneSet<'_>, k: &[E::T], v: &[E::T], scratch: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `isa()` reported AVX-512 F/BW/VL on this CPU.
        Isa::Avx512Vnni | Isa::Amx => unsafe { x86::attend_avx512::<E>(set, k, v, scratch) },
        // SAFETY: `isa()` reported AVX2, FMA and F16C on this CPU.
        Isa::Avx2 => unsafe { avx2::attend_avx2::<E>(set, k, v, scratch) },
        // SAFETY: the scalar kernels need no CPU feature.
        Isa::Scalar => unsafe { attend::<Scalar, E>(set, k, v, scratch) },
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        // SAFETY: the scalar kernels need no CPU feature.
        unsafe { attend::<Scalar, E>(set, k, v, scratch) }
    }
}

/// Merges the chunk states of one split lane set in chunk order and writes its normalised
/// output rows (the same [`fold`] and [`normalise`] as an unsplit lane set).
fn merge_chunks(step: &Step<'_>, seq: &SeqAttentionMetadata, it: &MergeItem) {
    let AttentionShape {
        num_heads: h,
        num_kv_heads: hkv,
        head_dim: d,
        ..
    } = step.shape;
    let group = h / hkv;
    let lanes = it.rows * group;
    let stride = lanes * (d + 2);
    // SAFETY: the merge item's partial region (`chunks * stride` floats) was laid out by
    // `forward` for it alone and written by its chunk items, which have all finished.
    let part = unsafe {
        std::slice::from_raw_parts(
            step.partials.0.add(it.partial) as *const f32,
            it.chunks * stride,
        )
    };
    let mut mo = [0f32; 256];
    let mut mo_heap = Vec::new();
    let mo: &mut [f32] = if d <= mo.len() {
        &mut mo[..d]
    } else {
        mo_heap.resize(d, 0.0);
        &mut mo_heap
    };
    for r in 0..it.rows {
        let t = seq.query_start + it.row0 + r;
        let start = (t * h + it.kv_head * group) * d;
        debug_assert!(start + group * d <= step.out_len);
        // SAFETY: `check_seqs` keeps `t < num_tokens`, so the region is inside the output, and
        // only this merge item writes heads `kv_head * group ..` of token `t`.
        let out = unsafe { std::slice::from_raw_parts_mut(step.out.0.add(start), group * d) };
        for g in 0..group {
            let lane = r * group + g;
            let (mut mm, mut ml) = (f32::NEG_INFINITY, 0f32);
            for c in 0..it.chunks {
                let p = &part[c * stride + lane * (d + 2)..][..d + 2];
                fold(&mut mm, &mut ml, mo, p[0], p[1], &p[2..]);
            }
            normalise(&mut out[g * d..][..d], ml, mo);
        }
    }
}

mod kernel;

use kernel::{Bf16E, Elem, F16E, F32E, Scalar, attend, fold, normalise};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;
