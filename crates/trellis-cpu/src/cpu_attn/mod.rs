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
mod x86;

#[cfg(test)]
mod tests;
