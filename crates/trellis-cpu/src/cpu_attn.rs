//! `CPU_ATTN`: paged attention with SIMD kernels, online softmax and the compute pool (vLLM's
//! name for its CPU backend).
//!
//! # Layout
//!
//! Each layer owns a K and a V cache of `[num_blocks, num_kv_heads, block_size, head_dim]`
//! elements: inside a block, the `block_size` rows of one KV head are contiguous, so a
//! sequence's keys for one head are read in place, a block at a time, straight from the
//! block table (no gather, no copy). The element type is the [`KvCacheSpec::dtype`]: `F32`,
//! `F16` or `BF16`. New keys and values arrive in f32 and are rounded to nearest even when
//! stored; they are widened back to f32 as they are read. Queries, scores, accumulators and
//! outputs are f32.
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
//! form the *lanes* that share each key and value row: a tile's rows are located once
//! (walking the block table), widened once when the cache is f16/bf16, and used by every
//! lane, lanes being at most [`MAX_LANES`] (or one row's group, if larger). Causality is per
//! lane: a lane of the `i`-th new token sees `context_len - query_len + i + 1` positions; the
//! weights of positions it does not see are zero.
//!
//! Per tile: scores `scale * q·k` for every lane and row (four key rows per pass with one
//! four-way horizontal sum), then per lane the tile maximum, the rescale and `exp` (a
//! vectorised polynomial, within a few f32 ulps), then the weighted value rows added
//! into the lanes' accumulators (held in registers across the tile's rows).
//!
//! # SIMD and threads
//!
//! The kernels (scores, value accumulation, max, exp, f16/bf16 widening) have AVX-512
//! (F/BW/VL), AVX2 (with FMA and F16C) and scalar versions, chosen at run time with
//! [`trellis_kernels::cpu::isa`] (`TRELLIS_ISA=avx2|scalar` caps it for comparisons); the
//! binary itself assumes only SSE2. Each version of the per-lane-set loop is compiled inside
//! a `#[target_feature]` function so the kernels inline into it. The work items are
//! (sequence, KV head, tile of up to [`ROW_TILE`] query rows), run on
//! [`trellis_kernels::pool::global`] (steps under [`SERIAL_WORK`] run on the calling
//! thread); every item writes a disjoint set of output rows (the
//! step is checked first: sequences may not overlap in the batch). Each thread keeps its
//! scratch (accumulators, scores, a tile of widened rows) in a thread-local vector, so a call
//! allocates only its output (the work-item list keeps its capacity in the layer).
//!
//! # Speed
//!
//! `cargo run -p trellis-cpu --example attn_bench` reports decode time per layer against
//! `CPU_REFERENCE` for the default model's shape.

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
pub const MAX_LANES: usize = 16;

/// Multiply-adds (`query rows × context × heads × head size`, summed over the step) below
/// which a step runs on the calling thread instead of the compute pool.
pub const SERIAL_WORK: usize = 1 << 16;

/// Most query rows in one work item: long prefills are split into tiles of this many rows.
pub const ROW_TILE: usize = 32;

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

    /// Stores `src` at `off`, rounding to nearest even for f16/bf16.
    fn write(&mut self, off: usize, src: &[f32]) {
        match self {
            KvBuf::F32(c) => c[off..off + src.len()].copy_from_slice(src),
            KvBuf::F16(c) => {
                for (d, &x) in c[off..off + src.len()].iter_mut().zip(src) {
                    *d = half::f16::from_f32(x).to_bits();
                }
            }
            KvBuf::Bf16(c) => {
                for (d, &x) in c[off..off + src.len()].iter_mut().zip(src) {
                    *d = half::bf16::from_f32(x).to_bits();
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
    /// `[num_blocks, num_kv_heads, block_size, head_dim]`.
    k_cache: KvBuf,
    /// `[num_blocks, num_kv_heads, block_size, head_dim]`.
    v_cache: KvBuf,
    /// The work items of the last call, kept for their capacity.
    items: Vec<WorkItem>,
}

/// (sequence, KV head, query rows) run by one pool item.
#[derive(Debug, Clone, Copy)]
struct WorkItem {
    seq: usize,
    kv_head: usize,
    row0: usize,
    rows: usize,
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
                let dst = ((block * hkv + kh) * bs + off) * d;
                let src = (t * hkv + kh) * d;
                self.k_cache.write(dst, &k[src..src + d]);
                self.v_cache.write(dst, &v[src..src + d]);
            }
        }

        // 2. Attention, in parallel over (sequence, KV head, row tile).
        let mut items = std::mem::take(&mut self.items);
        items.clear();
        for (s, seq) in metadata.seqs.iter().enumerate() {
            // Longest tiles (the last rows) first, for balance.
            let tiles = seq.query_len.div_ceil(ROW_TILE);
            for tile in (0..tiles).rev() {
                let row0 = tile * ROW_TILE;
                let rows = ROW_TILE.min(seq.query_len - row0);
                for kv_head in 0..hkv {
                    items.push(WorkItem {
                        seq: s,
                        kv_head,
                        row0,
                        rows,
                    });
                }
            }
        }
        let mut out = vec![0f32; num_tokens * h * d];
        let step = Step {
            q,
            k: self.k_cache.view(),
            v: self.v_cache.view(),
            out: OutPtr(out.as_mut_ptr()),
            out_len: out.len(),
            shape,
            block_size: bs,
        };
        let isa = trellis_kernels::cpu::isa();
        let group = h / hkv;
        let rows_per_set = (MAX_LANES / group).max(1);
        let run_item = |i: usize| {
            let it = items[i];
            let seq = &metadata.seqs[it.seq];
            let mut r = 0;
            while r < it.rows {
                let rows = rows_per_set.min(it.rows - r);
                let set = LaneSet {
                    step: &step,
                    seq,
                    kv_head: it.kv_head,
                    row0: it.row0 + r,
                    rows,
                };
                run_lane_set(isa, &set);
                r += rows;
            }
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
        } else {
            trellis_kernels::pool::global().run(items.len(), run_item);
        }
        self.items = items;
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
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: `isa()` reported AVX-512 F/BW/VL on this CPU.
            Isa::Avx512Vnni | Isa::Amx => unsafe { x86::attend_avx512(set, &mut scratch) },
            // SAFETY: `isa()` reported AVX2, FMA and F16C on this CPU.
            Isa::Avx2 => unsafe { x86::attend_avx2(set, &mut scratch) },
            // SAFETY: the scalar kernels need no CPU feature.
            Isa::Scalar => unsafe { attend::<Scalar>(set, &mut scratch) },
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = isa;
            // SAFETY: the scalar kernels need no CPU feature.
            unsafe { attend::<Scalar>(set, &mut scratch) }
        }
    });
}

/// The vector kernels of one instruction set. Every method is `unsafe` because an
/// implementation may require CPU features: call it only where they are present.
trait Kernels {
    /// `out[i * stride] = scale * (q[i*d..(i+1)*d] · k)` for `i < q.len() / d`; `k.len() == d`.
    unsafe fn dot_group(q: &[f32], d: usize, k: &[f32], scale: f32, out: &mut [f32], stride: usize);
    /// `acc[i*d..(i+1)*d] += w[i * stride] * v` for `i < n`; `v.len() == d`.
    unsafe fn axpy_group(acc: &mut [f32], d: usize, w: &[f32], stride: usize, n: usize, v: &[f32]);
    /// `out[i * TILE + j] = scale * (q[i*d..(i+1)*d] · k[j])` for every lane
    /// `i < q.len() / d` and row `j < k.len()`; every `k[j].len() == d`.
    unsafe fn dot_tile(q: &[f32], d: usize, k: &[&[f32]], scale: f32, out: &mut [f32]) {
        for (j, row) in k.iter().enumerate() {
            // SAFETY: the caller guarantees the features `dot_group` needs.
            unsafe { Self::dot_group(q, d, row, scale, &mut out[j..], TILE) };
        }
    }
    /// `acc[i*d..(i+1)*d] += Σ_j w[i * TILE + j] * v[j]` for every lane `i < acc.len() / d`;
    /// every `v[j].len() == d`.
    unsafe fn axpy_tile(acc: &mut [f32], d: usize, w: &[f32], v: &[&[f32]]) {
        for (j, row) in v.iter().enumerate() {
            // SAFETY: the caller guarantees the features `axpy_group` needs.
            unsafe { Self::axpy_group(acc, d, &w[j..], TILE, acc.len() / d, row) };
        }
    }
    /// `y *= a`.
    unsafe fn scale(y: &mut [f32], a: f32);
    /// The largest element (`-inf` for none).
    unsafe fn max(s: &[f32]) -> f32;
    /// `s = exp(s - m)` (every `s <= m`), returning the sum.
    unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32;
    /// Widens f16 bit patterns to f32; `dst.len() == src.len()`.
    unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]);
    /// Widens bf16 bit patterns to f32; `dst.len() == src.len()`.
    unsafe fn bf16_to_f32(src: &[u16], dst: &mut [f32]);
}

/// Portable kernels, for any CPU.
struct Scalar;

impl Kernels for Scalar {
    unsafe fn dot_group(
        q: &[f32],
        d: usize,
        k: &[f32],
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        for (i, qr) in q.chunks_exact(d).enumerate() {
            out[i * stride] = scale * qr.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
        }
    }

    unsafe fn axpy_group(acc: &mut [f32], d: usize, w: &[f32], stride: usize, n: usize, v: &[f32]) {
        for (i, a) in acc.chunks_exact_mut(d).take(n).enumerate() {
            let wi = w[i * stride];
            a.iter_mut().zip(v).for_each(|(a, x)| *a += wi * x);
        }
    }

    unsafe fn max(s: &[f32]) -> f32 {
        s.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32 {
        let mut sum = 0.0;
        for x in s.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        sum
    }

    unsafe fn scale(y: &mut [f32], a: f32) {
        y.iter_mut().for_each(|x| *x *= a);
    }

    unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = half::f16::from_bits(s).to_f32();
        }
    }

    unsafe fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s as u32) << 16);
        }
    }
}

/// The cache rows at `offs` as f32 slices: in place for f32, else widened into `buf`
/// (`offs.len() * d` floats).
///
/// # Safety
/// The CPU features `K` needs must be present.
#[inline(always)]
unsafe fn tile_rows<'a, K: Kernels>(
    cache: KvView<'a>,
    offs: &[usize],
    d: usize,
    buf: &'a mut [f32],
) -> [&'a [f32]; TILE] {
    let mut rows: [&[f32]; TILE] = [&[]; TILE];
    match cache {
        KvView::F32(c) => {
            for (row, &off) in rows.iter_mut().zip(offs) {
                *row = &c[off..off + d];
            }
        }
        KvView::F16(c) | KvView::Bf16(c) => {
            let bf16 = matches!(cache, KvView::Bf16(_));
            for ((row, b), &off) in rows.iter_mut().zip(buf.chunks_exact_mut(d)).zip(offs) {
                // SAFETY: the caller guarantees `K`'s features.
                unsafe {
                    match bf16 {
                        true => K::bf16_to_f32(&c[off..off + d], b),
                        false => K::f16_to_f32(&c[off..off + d], b),
                    }
                }
                *row = b;
            }
        }
    }
    rows
}

/// The attention of one lane set (see the module docs), written into its output rows.
///
/// Scratch layout: `acc [lanes * d] | scores [lanes * TILE] | m [lanes] | l [lanes] |
/// tile [TILE * d]`, scores being lane-major so one lane's tile is contiguous for the
/// softmax; `tile` holds a tile of key or value rows widened from f16/bf16.
///
/// # Safety
/// The CPU features `K` needs must be present, and `set` must come from a checked call (its
/// rows, blocks and output region in range and owned by this lane set alone).
#[inline(always)]
unsafe fn attend<K: Kernels>(set: &LaneSet<'_>, scratch: &mut Vec<f32>) {
    let step = set.step;
    let AttentionShape {
        num_heads: h,
        num_kv_heads: hkv,
        head_dim: d,
        scale,
    } = step.shape;
    let bs = step.block_size;
    let group = h / hkv;
    let rows = set.rows;
    let lanes = rows * group;
    let need = lanes * d + TILE * lanes + 2 * lanes + TILE * d;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (acc, rest) = scratch.split_at_mut(lanes * d);
    let (scores, rest) = rest.split_at_mut(TILE * lanes);
    let (m, rest) = rest.split_at_mut(lanes);
    let (l, rest) = rest.split_at_mut(lanes);
    let tile_buf = &mut rest[..TILE * d];
    acc.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);

    let seq = set.seq;
    // Row `r` of the set (token `seq.query_start + row0 + r`) sees positions `< vis0 + r`.
    let vis0 = seq.context_len - seq.query_len + set.row0 + 1;
    let end = vis0 + rows - 1;
    let q_block = |r: usize| {
        let t = seq.query_start + set.row0 + r;
        &step.q[(t * h + set.kv_head * group) * d..][..group * d]
    };
    let kv_head = set.kv_head;
    let mut offs = [0usize; TILE];

    let mut p0 = 0;
    while p0 < end {
        let p1 = (p0 + TILE).min(end);
        let n = p1 - p0;
        // Cache offsets of the tile's rows, walking the block table without divisions.
        let (mut blk, mut within) = (p0 / bs, p0 % bs);
        for off in offs[..n].iter_mut() {
            *off = ((seq.block_table[blk] as usize * hkv + kv_head) * bs + within) * d;
            within += 1;
            if within == bs {
                (blk, within) = (blk + 1, 0);
            }
        }
        // Scaled scores of the tile, lane-major. Row `r` sees the tile's first
        // `vis0 + r - p0` positions; rows that see none are skipped, the scores of positions a
        // row does not see are computed (from finite rows) but never used.
        {
            // SAFETY: the caller guarantees `K`'s features.
            let k_rows = unsafe { tile_rows::<K>(step.k, &offs[..n], d, tile_buf) };
            for r in (p0 + 1).saturating_sub(vis0)..rows {
                let out = &mut scores[r * group * TILE..];
                // SAFETY: the caller guarantees `K`'s features.
                unsafe { K::dot_tile(q_block(r), d, &k_rows[..n], scale, out) };
            }
        }
        // Online softmax update: rescale by the new maximum, turn scores into weights.
        for lane in 0..lanes {
            let visible = (vis0 + lane / group).saturating_sub(p0).min(n);
            // Weights of positions this lane does not see are 0 (they are finite cache rows).
            scores[lane * TILE + visible..lane * TILE + n].fill(0.0);
            if visible == 0 {
                continue;
            }
            let s = &mut scores[lane * TILE..][..visible];
            // SAFETY: the caller guarantees `K`'s features.
            let new_m = m[lane].max(unsafe { K::max(s) });
            if new_m > m[lane] {
                let corr = (m[lane] - new_m).exp();
                l[lane] *= corr;
                // SAFETY: the caller guarantees `K`'s features.
                unsafe { K::scale(&mut acc[lane * d..][..d], corr) };
                m[lane] = new_m;
            }
            // SAFETY: the caller guarantees `K`'s features.
            l[lane] += unsafe { K::exp_sum(s, new_m) };
        }
        // Weighted values: the tile's rows (widened once) into every lane's accumulator.
        // SAFETY: the caller guarantees `K`'s features.
        let v_rows = unsafe { tile_rows::<K>(step.v, &offs[..n], d, tile_buf) };
        // SAFETY: the caller guarantees `K`'s features.
        unsafe { K::axpy_tile(acc, d, scores, &v_rows[..n]) };
        p0 = p1;
    }

    // Normalise into the output rows of this set.
    for r in 0..rows {
        let t = seq.query_start + set.row0 + r;
        let start = (t * h + set.kv_head * group) * d;
        debug_assert!(start + group * d <= step.out_len);
        // SAFETY: `check_seqs` keeps `t < num_tokens`, so the region is inside the output, and
        // no other lane set writes heads `kv_head * group ..` of token `t`.
        let out = unsafe { std::slice::from_raw_parts_mut(step.out.0.add(start), group * d) };
        for g in 0..group {
            let lane = r * group + g;
            let inv = if l[lane] > 0.0 { 1.0 / l[lane] } else { 0.0 };
            for (o, a) in out[g * d..][..d].iter_mut().zip(&acc[lane * d..][..d]) {
                *o = a * inv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX-512 and AVX2 kernels and the lane-set entry points compiled for them.

    use std::arch::x86_64::*;

    use super::{Kernels, LaneSet, TILE, attend};

    /// The lane set with the AVX-512 kernels.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL; `set` as for [`attend`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn attend_avx512(set: &LaneSet<'_>, scratch: &mut Vec<f32>) {
        // SAFETY: this function's features are those `Avx512` needs.
        unsafe { attend::<Avx512>(set, scratch) }
    }

    /// The lane set with the AVX2 kernels.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `set` as for [`attend`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_avx2(set: &LaneSet<'_>, scratch: &mut Vec<f32>) {
        // SAFETY: this function's features are those `Avx2` needs.
        unsafe { attend::<Avx2>(set, scratch) }
    }

    /// `exp(x)` on 16 lanes: `2^n * p(r)` with `x = n ln2 + r`, `|r| <= ln2 / 2`, `p` the
    /// degree-7 Taylor polynomial (truncation error below 1e-8: a few f32 ulps in all);
    /// inputs below -87.3 give ~0.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp512(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
            _mm512_set1_ps(88.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_C[0]);
        for c in &EXP_C[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// One lane of [`exp512`], for tests.
    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp512_for_test(x: f32) -> f32 {
        _mm512_cvtss_f32(exp512(_mm512_set1_ps(x)))
    }

    /// `exp(x)` on 8 lanes, as [`exp512`]; `2^n` is built in the exponent bits.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp256(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_C[0]);
        for c in &EXP_C[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }

    /// ln 2 split in a part exact in f32 and the rest (Cody-Waite reduction).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    /// Taylor coefficients of `exp`, highest degree first: 1/5040 .. 1.
    const EXP_C: [f32; 8] = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];

    /// 16-lane kernels (AVX-512 F/BW/VL); tails use masked loads and stores.
    pub(super) struct Avx512;

    /// `out[j] = q_j · k` for `L` query rows of `d` starting at `q`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn dot512<const L: usize>(
        q: *const f32,
        d: usize,
        k: *const f32,
        scale: f32,
        out: *mut f32,
        stride: usize,
    ) {
        // SAFETY (whole body): the caller passes `L` rows of `d` floats at `q`, `d` at `k`
        // and `L` writable floats `stride` apart at `out`; masked loads touch only the tail's lanes.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); L];
            let mut i = 0;
            while i + 16 <= d {
                let kv = _mm512_loadu_ps(k.add(i));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(j * d + i)), kv, *a);
                }
                i += 16;
            }
            if i < d {
                let mask: __mmask16 = (1u16 << (d - i)) - 1;
                let kv = _mm512_maskz_loadu_ps(mask, k.add(i));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q.add(j * d + i)), kv, *a);
                }
            }
            for (j, a) in acc.iter().enumerate() {
                *out.add(j * stride) = scale * _mm512_reduce_add_ps(*a);
            }
        }
    }

    /// `acc_j += w[j] * v` for `L` accumulator rows of `d` starting at `acc`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn axpy512<const L: usize>(
        acc: *mut f32,
        d: usize,
        w: *const f32,
        stride: usize,
        v: *const f32,
    ) {
        // SAFETY (whole body): the caller passes `L` rows of `d` floats at `acc`, `L` weights
        // at `w` and `d` floats at `v`; masked accesses touch only the tail's lanes.
        unsafe {
            let mut ws = [_mm512_setzero_ps(); L];
            for (j, x) in ws.iter_mut().enumerate() {
                *x = _mm512_set1_ps(*w.add(j * stride));
            }
            let mut i = 0;
            while i + 16 <= d {
                let vv = _mm512_loadu_ps(v.add(i));
                for (j, x) in ws.iter().enumerate() {
                    let p = acc.add(j * d + i);
                    _mm512_storeu_ps(p, _mm512_fmadd_ps(*x, vv, _mm512_loadu_ps(p)));
                }
                i += 16;
            }
            if i < d {
                let mask: __mmask16 = (1u16 << (d - i)) - 1;
                let vv = _mm512_maskz_loadu_ps(mask, v.add(i));
                for (j, x) in ws.iter().enumerate() {
                    let p = acc.add(j * d + i);
                    let y = _mm512_fmadd_ps(*x, vv, _mm512_maskz_loadu_ps(mask, p));
                    _mm512_mask_storeu_ps(p, mask, y);
                }
            }
        }
    }

    /// `acc_l += Σ_j w[l * TILE + j] * rows[j]` for `L` lanes, 64 columns at a time with the
    /// accumulators held in registers across the rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn tile512<const L: usize>(acc: *mut f32, d: usize, w: *const f32, rows: &[*const f32]) {
        // SAFETY (whole body): the caller passes `L` accumulator rows of `d` floats at `acc`,
        // `L` weight rows of `TILE` at `w` and `rows.len() <= TILE` rows of `d` floats; masked
        // accesses touch only columns below `d`.
        unsafe {
            let mut b = 0;
            while b < d {
                let mut masks = [0 as __mmask16; 4];
                for (c, m) in masks.iter_mut().enumerate() {
                    let left = d.saturating_sub(b + 16 * c).min(16);
                    *m = ((1u32 << left) - 1) as __mmask16;
                }
                let mut accs = [[_mm512_setzero_ps(); 4]; L];
                for (l, a) in accs.iter_mut().enumerate() {
                    for (c, x) in a.iter_mut().enumerate() {
                        *x = _mm512_maskz_loadu_ps(masks[c], acc.add(l * d + b + 16 * c));
                    }
                }
                for (j, &row) in rows.iter().enumerate() {
                    let mut vs = [_mm512_setzero_ps(); 4];
                    for (c, x) in vs.iter_mut().enumerate() {
                        *x = _mm512_maskz_loadu_ps(masks[c], row.add(b + 16 * c));
                    }
                    for (l, a) in accs.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(*w.add(l * TILE + j));
                        for (x, v) in a.iter_mut().zip(&vs) {
                            *x = _mm512_fmadd_ps(wv, *v, *x);
                        }
                    }
                }
                for (l, a) in accs.iter().enumerate() {
                    for (c, x) in a.iter().enumerate() {
                        _mm512_mask_storeu_ps(acc.add(l * d + b + 16 * c), masks[c], *x);
                    }
                }
                b += 64;
            }
        }
    }

    /// The four horizontal sums of `a`, as `[Σa0, Σa1, Σa2, Σa3]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    fn hsum4_512(a: [__m512; 4]) -> __m128 {
        let fold = |x: __m512| {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
            _mm256_add_ps(_mm512_castps512_ps256(x), hi)
        };
        let h01 = _mm256_hadd_ps(fold(a[0]), fold(a[1]));
        let h23 = _mm256_hadd_ps(fold(a[2]), fold(a[3]));
        let h = _mm256_hadd_ps(h01, h23);
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    impl Kernels for Avx512 {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn dot_group(
            q: &[f32],
            d: usize,
            k: &[f32],
            scale: f32,
            out: &mut [f32],
            stride: usize,
        ) {
            let n = q.len() / d;
            if n == 0 {
                return;
            }
            assert!(k.len() >= d && out.len() > (n - 1) * stride);
            let (q, k, o) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
            let mut j = 0;
            // SAFETY: rows `j..j + L` are inside `q` and `out` (asserted above).
            unsafe {
                while j + 4 <= n {
                    dot512::<4>(q.add(j * d), d, k, scale, o.add(j * stride), stride);
                    j += 4;
                }
                match n - j {
                    3 => dot512::<3>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                    2 => dot512::<2>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                    1 => dot512::<1>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                    _ => {}
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn axpy_group(
            acc: &mut [f32],
            d: usize,
            w: &[f32],
            stride: usize,
            n: usize,
            v: &[f32],
        ) {
            if n == 0 {
                return;
            }
            assert!(acc.len() >= n * d && w.len() > (n - 1) * stride && v.len() >= d);
            let (a, w, v) = (acc.as_mut_ptr(), w.as_ptr(), v.as_ptr());
            let mut j = 0;
            // SAFETY: rows `j..j + L` are inside `acc` and `w` (asserted above).
            unsafe {
                while j + 4 <= n {
                    axpy512::<4>(a.add(j * d), d, w.add(j * stride), stride, v);
                    j += 4;
                }
                match n - j {
                    3 => axpy512::<3>(a.add(j * d), d, w.add(j * stride), stride, v),
                    2 => axpy512::<2>(a.add(j * d), d, w.add(j * stride), stride, v),
                    1 => axpy512::<1>(a.add(j * d), d, w.add(j * stride), stride, v),
                    _ => {}
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn dot_tile(q: &[f32], d: usize, k: &[&[f32]], scale: f32, out: &mut [f32]) {
            let (lanes, n) = (q.len() / d, k.len());
            if lanes == 0 || n == 0 {
                return;
            }
            assert!(n <= TILE && out.len() >= (lanes - 1) * TILE + n);
            assert!(k.iter().all(|r| r.len() >= d));
            let mut rows = [std::ptr::null::<f32>(); TILE];
            for (p, r) in rows.iter_mut().zip(k) {
                *p = r.as_ptr();
            }
            // SAFETY: lane `l` reads `q[l*d..][..d]` and writes `out[l*TILE..][..n]`, rows
            // hold `d` floats each (asserted above); masked loads touch only columns below `d`.
            unsafe {
                let sv = _mm_set1_ps(scale);
                for l in 0..lanes {
                    let (ql, o) = (q.as_ptr().add(l * d), out.as_mut_ptr().add(l * TILE));
                    let mut j = 0;
                    // Groups of four rows; the last group repeats its last row, so every
                    // score comes from the same reduction whatever the tile's length (results
                    // must not depend on how a batch was split).
                    while j < n {
                        let r = [0, 1, 2, 3].map(|t| rows[(j + t).min(n - 1)]);
                        let mut acc = [_mm512_setzero_ps(); 4];
                        let mut i = 0;
                        while i < d {
                            let mask: __mmask16 = ((1u32 << (d - i).min(16)) - 1) as __mmask16;
                            let qv = _mm512_maskz_loadu_ps(mask, ql.add(i));
                            for (a, &row) in acc.iter_mut().zip(&r) {
                                let kv = _mm512_maskz_loadu_ps(mask, row.add(i));
                                *a = _mm512_fmadd_ps(qv, kv, *a);
                            }
                            i += 16;
                        }
                        let mut sums = [0f32; 4];
                        _mm_storeu_ps(sums.as_mut_ptr(), _mm_mul_ps(sv, hsum4_512(acc)));
                        for (t, &x) in sums.iter().enumerate().take(n - j) {
                            *o.add(j + t) = x;
                        }
                        j += 4;
                    }
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn axpy_tile(acc: &mut [f32], d: usize, w: &[f32], v: &[&[f32]]) {
            let lanes = acc.len() / d;
            if lanes == 0 || v.is_empty() {
                return;
            }
            assert!(w.len() >= (lanes - 1) * TILE + v.len() && v.len() <= TILE);
            assert!(v.iter().all(|r| r.len() >= d));
            let mut rows = [std::ptr::null::<f32>(); TILE];
            for (p, r) in rows.iter_mut().zip(v) {
                *p = r.as_ptr();
            }
            let (a, w, rows) = (acc.as_mut_ptr(), w.as_ptr(), &rows[..v.len()]);
            let mut j = 0;
            // SAFETY: lanes `j..j + L` are inside `acc` and `w`, rows hold `d` floats each
            // (asserted above).
            unsafe {
                while j + 4 <= lanes {
                    tile512::<4>(a.add(j * d), d, w.add(j * TILE), rows);
                    j += 4;
                }
                match lanes - j {
                    3 => tile512::<3>(a.add(j * d), d, w.add(j * TILE), rows),
                    2 => tile512::<2>(a.add(j * d), d, w.add(j * TILE), rows),
                    1 => tile512::<1>(a.add(j * d), d, w.add(j * TILE), rows),
                    _ => {}
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn scale(y: &mut [f32], a: f32) {
            let (p, d) = (y.as_mut_ptr(), y.len());
            // SAFETY: accesses stay inside `y` (full chunks, then a masked tail).
            unsafe {
                let s = _mm512_set1_ps(a);
                let mut i = 0;
                while i + 16 <= d {
                    _mm512_storeu_ps(p.add(i), _mm512_mul_ps(s, _mm512_loadu_ps(p.add(i))));
                    i += 16;
                }
                if i < d {
                    let mask: __mmask16 = (1u16 << (d - i)) - 1;
                    let x = _mm512_maskz_loadu_ps(mask, p.add(i));
                    _mm512_mask_storeu_ps(p.add(i), mask, _mm512_mul_ps(s, x));
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn max(s: &[f32]) -> f32 {
            let (p, n) = (s.as_ptr(), s.len());
            // SAFETY: accesses stay inside `s` (full chunks, then a masked tail).
            unsafe {
                let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
                let mut i = 0;
                while i + 16 <= n {
                    m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
                    i += 16;
                }
                if i < n {
                    let mask: __mmask16 = (1u16 << (n - i)) - 1;
                    m = _mm512_mask_max_ps(m, mask, m, _mm512_maskz_loadu_ps(mask, p.add(i)));
                }
                _mm512_reduce_max_ps(m)
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32 {
            let (p, n) = (s.as_mut_ptr(), s.len());
            // SAFETY: accesses stay inside `s` (full chunks, then a masked tail).
            unsafe {
                let mv = _mm512_set1_ps(m);
                let mut sum = _mm512_setzero_ps();
                let mut i = 0;
                while i + 16 <= n {
                    let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv));
                    _mm512_storeu_ps(p.add(i), e);
                    sum = _mm512_add_ps(sum, e);
                    i += 16;
                }
                if i < n {
                    let mask: __mmask16 = (1u16 << (n - i)) - 1;
                    let x = _mm512_maskz_loadu_ps(mask, p.add(i));
                    let e = exp512(_mm512_sub_ps(x, mv));
                    _mm512_mask_storeu_ps(p.add(i), mask, e);
                    sum = _mm512_mask_add_ps(sum, mask, sum, e);
                }
                _mm512_reduce_add_ps(sum)
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
            let d = src.len().min(dst.len());
            let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
            // SAFETY: accesses stay inside the first `d` elements of both slices.
            unsafe {
                let mut i = 0;
                while i + 16 <= d {
                    let h = _mm256_loadu_si256(s.add(i) as *const __m256i);
                    _mm512_storeu_ps(o.add(i), _mm512_cvtph_ps(h));
                    i += 16;
                }
                if i < d {
                    let mask: __mmask16 = (1u16 << (d - i)) - 1;
                    let h = _mm256_maskz_loadu_epi16(mask, s.add(i) as *const i16);
                    _mm512_mask_storeu_ps(o.add(i), mask, _mm512_cvtph_ps(h));
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
            let d = src.len().min(dst.len());
            let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
            // SAFETY: accesses stay inside the first `d` elements of both slices.
            unsafe {
                let mut i = 0;
                while i + 16 <= d {
                    let h = _mm256_loadu_si256(s.add(i) as *const __m256i);
                    let x = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                    _mm512_storeu_ps(o.add(i), _mm512_castsi512_ps(x));
                    i += 16;
                }
                if i < d {
                    let mask: __mmask16 = (1u16 << (d - i)) - 1;
                    let h = _mm256_maskz_loadu_epi16(mask, s.add(i) as *const i16);
                    let x = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                    _mm512_mask_storeu_ps(o.add(i), mask, _mm512_castsi512_ps(x));
                }
            }
        }
    }

    /// 8-lane kernels (AVX2 + FMA + F16C); tails in scalar code.
    pub(super) struct Avx2;

    /// Horizontal sum of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum256(x: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// `out[j] = q_j · k` for `L` query rows of `d` starting at `q`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot256<const L: usize>(
        q: *const f32,
        d: usize,
        k: *const f32,
        scale: f32,
        out: *mut f32,
        stride: usize,
    ) {
        // SAFETY (whole body): the caller passes `L` rows of `d` floats at `q`, `d` at `k`
        // and `L` writable floats `stride` apart at `out`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); L];
            let mut i = 0;
            while i + 8 <= d {
                let kv = _mm256_loadu_ps(k.add(i));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(j * d + i)), kv, *a);
                }
                i += 8;
            }
            for (j, a) in acc.iter().enumerate() {
                let mut s = hsum256(*a);
                for x in i..d {
                    s += *q.add(j * d + x) * *k.add(x);
                }
                *out.add(j * stride) = scale * s;
            }
        }
    }

    /// `acc_j += w[j] * v` for `L` accumulator rows of `d` starting at `acc`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn axpy256<const L: usize>(
        acc: *mut f32,
        d: usize,
        w: *const f32,
        stride: usize,
        v: *const f32,
    ) {
        // SAFETY (whole body): the caller passes `L` rows of `d` floats at `acc`, `L` weights
        // at `w` and `d` floats at `v`.
        unsafe {
            let mut ws = [_mm256_setzero_ps(); L];
            for (j, x) in ws.iter_mut().enumerate() {
                *x = _mm256_set1_ps(*w.add(j * stride));
            }
            let mut i = 0;
            while i + 8 <= d {
                let vv = _mm256_loadu_ps(v.add(i));
                for (j, x) in ws.iter().enumerate() {
                    let p = acc.add(j * d + i);
                    _mm256_storeu_ps(p, _mm256_fmadd_ps(*x, vv, _mm256_loadu_ps(p)));
                }
                i += 8;
            }
            for j in 0..L {
                let wj = *w.add(j * stride);
                for x in i..d {
                    *acc.add(j * d + x) += wj * *v.add(x);
                }
            }
        }
    }

    /// The four horizontal sums of `a`, as `[Σa0, Σa1, Σa2, Σa3]`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum4_256(a: [__m256; 4]) -> __m128 {
        let h01 = _mm256_hadd_ps(a[0], a[1]);
        let h23 = _mm256_hadd_ps(a[2], a[3]);
        let h = _mm256_hadd_ps(h01, h23);
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    /// `acc_l[b..b + 8C] += Σ_j w[l * TILE + j] * rows[j][b..b + 8C]` for `L` lanes, the
    /// accumulators held in registers across the rows.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile256<const L: usize, const C: usize>(
        acc: *mut f32,
        d: usize,
        b: usize,
        w: *const f32,
        rows: &[*const f32],
    ) {
        // SAFETY (whole body): the caller passes `L` accumulator rows of `d` floats at `acc`,
        // `L` weight rows of `TILE` at `w`, rows of `d` floats, and `b + 8 * C <= d`.
        unsafe {
            let mut accs = [[_mm256_setzero_ps(); C]; L];
            for (l, a) in accs.iter_mut().enumerate() {
                for (c, x) in a.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(acc.add(l * d + b + 8 * c));
                }
            }
            for (j, &row) in rows.iter().enumerate() {
                let mut vs = [_mm256_setzero_ps(); C];
                for (c, x) in vs.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(row.add(b + 8 * c));
                }
                for (l, a) in accs.iter_mut().enumerate() {
                    let wv = _mm256_set1_ps(*w.add(l * TILE + j));
                    for (x, v) in a.iter_mut().zip(&vs) {
                        *x = _mm256_fmadd_ps(wv, *v, *x);
                    }
                }
            }
            for (l, a) in accs.iter().enumerate() {
                for (c, x) in a.iter().enumerate() {
                    _mm256_storeu_ps(acc.add(l * d + b + 8 * c), *x);
                }
            }
        }
    }

    /// [`tile256`] over all columns of `L` lanes: 16 at a time, then 8, then scalar.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile256_lanes<const L: usize>(
        acc: *mut f32,
        d: usize,
        w: *const f32,
        rows: &[*const f32],
    ) {
        // SAFETY: as for `tile256`, every block stays below `d`.
        unsafe {
            let mut b = 0;
            while b + 16 <= d {
                tile256::<L, 2>(acc, d, b, w, rows);
                b += 16;
            }
            if b + 8 <= d {
                tile256::<L, 1>(acc, d, b, w, rows);
                b += 8;
            }
            for l in 0..L {
                for (j, &row) in rows.iter().enumerate() {
                    let wj = *w.add(l * TILE + j);
                    for x in b..d {
                        *acc.add(l * d + x) += wj * *row.add(x);
                    }
                }
            }
        }
    }

    impl Kernels for Avx2 {
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn dot_group(
            q: &[f32],
            d: usize,
            k: &[f32],
            scale: f32,
            out: &mut [f32],
            stride: usize,
        ) {
            let n = q.len() / d;
            if n == 0 {
                return;
            }
            assert!(k.len() >= d && out.len() > (n - 1) * stride);
            let (q, k, o) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
            let mut j = 0;
            // SAFETY: rows `j..j + L` are inside `q` and `out` (asserted above).
            unsafe {
                while j + 4 <= n {
                    dot256::<4>(q.add(j * d), d, k, scale, o.add(j * stride), stride);
                    j += 4;
                }
                match n - j {
                    3 => dot256::<3>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                    2 => dot256::<2>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                    1 => dot256::<1>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                    _ => {}
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn axpy_group(
            acc: &mut [f32],
            d: usize,
            w: &[f32],
            stride: usize,
            n: usize,
            v: &[f32],
        ) {
            if n == 0 {
                return;
            }
            assert!(acc.len() >= n * d && w.len() > (n - 1) * stride && v.len() >= d);
            let (a, w, v) = (acc.as_mut_ptr(), w.as_ptr(), v.as_ptr());
            let mut j = 0;
            // SAFETY: rows `j..j + L` are inside `acc` and `w` (asserted above).
            unsafe {
                while j + 4 <= n {
                    axpy256::<4>(a.add(j * d), d, w.add(j * stride), stride, v);
                    j += 4;
                }
                match n - j {
                    3 => axpy256::<3>(a.add(j * d), d, w.add(j * stride), stride, v),
                    2 => axpy256::<2>(a.add(j * d), d, w.add(j * stride), stride, v),
                    1 => axpy256::<1>(a.add(j * d), d, w.add(j * stride), stride, v),
                    _ => {}
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn dot_tile(q: &[f32], d: usize, k: &[&[f32]], scale: f32, out: &mut [f32]) {
            let (lanes, n) = (q.len() / d, k.len());
            if lanes == 0 || n == 0 {
                return;
            }
            assert!(n <= TILE && out.len() >= (lanes - 1) * TILE + n);
            assert!(k.iter().all(|r| r.len() >= d));
            let mut rows = [std::ptr::null::<f32>(); TILE];
            for (p, r) in rows.iter_mut().zip(k) {
                *p = r.as_ptr();
            }
            // SAFETY: lane `l` reads `q[l*d..][..d]` and writes `out[l*TILE..][..n]`, rows
            // hold `d` floats each (asserted above).
            unsafe {
                let full = d / 8 * 8;
                for l in 0..lanes {
                    let (ql, o) = (q.as_ptr().add(l * d), out.as_mut_ptr().add(l * TILE));
                    let mut j = 0;
                    // Groups of four rows, the last one padded, as in the AVX-512 version.
                    while j < n {
                        let r = [0, 1, 2, 3].map(|t| rows[(j + t).min(n - 1)]);
                        let mut acc = [_mm256_setzero_ps(); 4];
                        let mut i = 0;
                        while i < full {
                            let qv = _mm256_loadu_ps(ql.add(i));
                            for (a, &row) in acc.iter_mut().zip(&r) {
                                *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(i)), *a);
                            }
                            i += 8;
                        }
                        let mut sums = [0f32; 4];
                        _mm_storeu_ps(sums.as_mut_ptr(), hsum4_256(acc));
                        for (t, (sum, &row)) in sums.iter_mut().zip(&r).enumerate().take(n - j) {
                            for x in full..d {
                                *sum += *ql.add(x) * *row.add(x);
                            }
                            *o.add(j + t) = scale * *sum;
                        }
                        j += 4;
                    }
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn axpy_tile(acc: &mut [f32], d: usize, w: &[f32], v: &[&[f32]]) {
            let lanes = acc.len() / d;
            if lanes == 0 || v.is_empty() {
                return;
            }
            assert!(w.len() >= (lanes - 1) * TILE + v.len() && v.len() <= TILE);
            assert!(v.iter().all(|r| r.len() >= d));
            let mut rows = [std::ptr::null::<f32>(); TILE];
            for (p, r) in rows.iter_mut().zip(v) {
                *p = r.as_ptr();
            }
            let (a, w, rows) = (acc.as_mut_ptr(), w.as_ptr(), &rows[..v.len()]);
            let mut j = 0;
            // SAFETY: lanes `j..j + L` are inside `acc` and `w`, rows hold `d` floats each
            // (asserted above).
            unsafe {
                while j + 4 <= lanes {
                    tile256_lanes::<4>(a.add(j * d), d, w.add(j * TILE), rows);
                    j += 4;
                }
                match lanes - j {
                    3 => tile256_lanes::<3>(a.add(j * d), d, w.add(j * TILE), rows),
                    2 => tile256_lanes::<2>(a.add(j * d), d, w.add(j * TILE), rows),
                    1 => tile256_lanes::<1>(a.add(j * d), d, w.add(j * TILE), rows),
                    _ => {}
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn scale(y: &mut [f32], a: f32) {
            let (p, d) = (y.as_mut_ptr(), y.len());
            // SAFETY: accesses stay inside `y`.
            unsafe {
                let s = _mm256_set1_ps(a);
                let mut i = 0;
                while i + 8 <= d {
                    _mm256_storeu_ps(p.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(p.add(i))));
                    i += 8;
                }
                for x in i..d {
                    *p.add(x) *= a;
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn max(s: &[f32]) -> f32 {
            let (p, n) = (s.as_ptr(), s.len());
            let mut i = 0;
            let mut best = f32::NEG_INFINITY;
            // SAFETY: accesses stay inside `s`.
            unsafe {
                let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
                while i + 8 <= n {
                    m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
                    i += 8;
                }
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), m);
                for x in lanes {
                    best = best.max(x);
                }
            }
            s[i..].iter().fold(best, |a, &b| a.max(b))
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32 {
            let (p, n) = (s.as_mut_ptr(), s.len());
            let mut i = 0;
            let mut total;
            // SAFETY: accesses stay inside `s`.
            unsafe {
                let mv = _mm256_set1_ps(m);
                let mut sum = _mm256_setzero_ps();
                while i + 8 <= n {
                    let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
                    _mm256_storeu_ps(p.add(i), e);
                    sum = _mm256_add_ps(sum, e);
                    i += 8;
                }
                total = hsum256(sum);
            }
            for x in s[i..].iter_mut() {
                *x = (*x - m).exp();
                total += *x;
            }
            total
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
            let d = src.len().min(dst.len());
            let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
            let mut i = 0;
            // SAFETY: accesses stay inside the first `d` elements of both slices.
            unsafe {
                while i + 8 <= d {
                    let h = _mm_loadu_si128(s.add(i) as *const __m128i);
                    _mm256_storeu_ps(o.add(i), _mm256_cvtph_ps(h));
                    i += 8;
                }
            }
            for x in i..d {
                dst[x] = half::f16::from_bits(src[x]).to_f32();
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
            let d = src.len().min(dst.len());
            let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
            let mut i = 0;
            // SAFETY: accesses stay inside the first `d` elements of both slices.
            unsafe {
                while i + 8 <= d {
                    let h = _mm_loadu_si128(s.add(i) as *const __m128i);
                    let x = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
                    _mm256_storeu_ps(o.add(i), _mm256_castsi256_ps(x));
                    i += 8;
                }
            }
            for x in i..d {
                dst[x] = f32::from_bits((src[x] as u32) << 16);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every kernel set this CPU can run against plain loops, whatever `TRELLIS_ISA` says.

    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    /// # Safety
    /// The CPU features `K` needs must be present.
    unsafe fn check<K: Kernels>() {
        for d in [1, 3, 8, 15, 16, 17, 20, 64, 80, 128] {
            for n in 1..=9 {
                let (q, k) = (data(n * d, 1), data(d, 2));
                let stride = 3;
                let mut got = vec![0f32; n * stride];
                // SAFETY: the caller guarantees `K`'s features.
                unsafe { K::dot_group(&q, d, &k, 0.5, &mut got, stride) };
                for j in 0..n {
                    let want: f32 = q[j * d..][..d].iter().zip(&k).map(|(a, b)| a * b).sum();
                    assert!(
                        (got[j * stride] - 0.5 * want).abs() < 1e-4,
                        "dot d {d} n {n}"
                    );
                }
                let (mut acc, w, v) = (data(n * d, 3), data(n * stride, 4), data(d, 5));
                let mut want = acc.clone();
                for j in 0..n {
                    for x in 0..d {
                        want[j * d + x] += w[j * stride] * v[x];
                    }
                }
                // SAFETY: as above.
                unsafe { K::axpy_group(&mut acc, d, &w, stride, n, &v) };
                assert!(acc.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
            }
            // A tile of key rows against 1..=5 lanes.
            for lanes in 1..=5 {
                let rows: Vec<Vec<f32>> = (0..TILE - 1).map(|j| data(d, 20 + j as u32)).collect();
                let views: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
                let q = data(lanes * d, 12);
                let mut out = vec![0f32; lanes * TILE];
                // SAFETY: as above.
                unsafe { K::dot_tile(&q, d, &views, 0.5, &mut out) };
                for l in 0..lanes {
                    for (j, r) in rows.iter().enumerate() {
                        let want: f32 = q[l * d..][..d].iter().zip(r).map(|(a, b)| a * b).sum();
                        assert!(
                            (out[l * TILE + j] - 0.5 * want).abs() < 1e-4,
                            "dot_tile d {d}"
                        );
                    }
                }
            }
            // A tile of value rows into 1..=5 lanes.
            for lanes in 1..=5 {
                let rows: Vec<Vec<f32>> = (0..TILE - 3).map(|j| data(d, 10 + j as u32)).collect();
                let views: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
                let w = data(lanes * TILE, 9);
                let mut acc = data(lanes * d, 11);
                let mut want = acc.clone();
                for l in 0..lanes {
                    for (j, r) in rows.iter().enumerate() {
                        for x in 0..d {
                            want[l * d + x] += w[l * TILE + j] * r[x];
                        }
                    }
                }
                // SAFETY: as above.
                unsafe { K::axpy_tile(&mut acc, d, &w, &views) };
                assert!(
                    acc.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4),
                    "tile d {d}"
                );
            }
            let s = data(d, 8);
            // SAFETY: as above.
            let got = unsafe { K::max(&s) };
            assert_eq!(got, s.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let mut e: Vec<f32> = s.iter().map(|x| x * 60.0).collect();
            let m = e.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want: Vec<f32> = e.iter().map(|x| (x - m).exp()).collect();
            // SAFETY: as above.
            let sum = unsafe { K::exp_sum(&mut e, m) };
            assert!(
                (sum - want.iter().sum::<f32>()).abs() < 1e-5 * sum.max(1.0),
                "sum d {d}"
            );
            for (g, w) in e.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.max(1e-30) + 1e-37,
                    "exp d {d}: {g} vs {w}"
                );
            }
            let mut y = data(d, 6);
            let want: Vec<f32> = y.iter().map(|x| x * 0.25).collect();
            // SAFETY: as above.
            unsafe { K::scale(&mut y, 0.25) };
            assert_eq!(y, want);
            let x = data(d, 7);
            let h: Vec<u16> = x
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let b: Vec<u16> = x
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let mut out = vec![0f32; d];
            // SAFETY: as above.
            unsafe { K::f16_to_f32(&h, &mut out) };
            assert!(
                out.iter()
                    .zip(&h)
                    .all(|(o, &s)| *o == half::f16::from_bits(s).to_f32())
            );
            // SAFETY: as above.
            unsafe { K::bf16_to_f32(&b, &mut out) };
            assert!(
                out.iter()
                    .zip(&b)
                    .all(|(o, &s)| *o == half::bf16::from_bits(s).to_f32())
            );
        }
    }

    #[test]
    fn kernels_match_plain_loops() {
        // SAFETY: the scalar kernels need no CPU feature.
        unsafe { check::<Scalar>() };
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                // SAFETY: the features were just detected.
                unsafe { check::<x86::Avx2>() };
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                // SAFETY: the features were just detected.
                unsafe { check::<x86::Avx512>() };
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod exp_tests {
    #[test]
    fn vector_exp_is_accurate_over_the_softmax_range() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            // SAFETY: AVX-512 F checked above.
            let got = unsafe {
                let v = super::x86::exp512_for_test(x);
                v
            };
            let want = (x as f64).exp();
            let rel = ((got as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
    }
}
