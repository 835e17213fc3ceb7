//! The per-lane-set driver ([`attend`]), the kernel interface every instruction set implements
//! ([`Kernels`]), the portable kernels ([`Scalar`]) and the chunk merge ([`fold`]).
//!
//! Every function here computes a lane's result with a fixed sequence of operations that
//! depends only on that lane's query, its visible keys and values and the constants of this
//! module (see the module docs of [`super`] for why).

use trellis_plugin::AttentionShape;

use super::{CHUNK, LaneSet, TILE, Target, WIDEN_LANES};

/// Lane sets with at most this many lanes active prefetch the next tile's cache blocks.
const PREFETCH_LANES: usize = 8;

/// The storage kinds of a cache element.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum ElemKind {
    /// `f32`.
    F32,
    /// IEEE half precision, as its bit pattern.
    F16,
    /// bfloat16, as its bit pattern.
    Bf16,
}

/// A cache element type: its storage and how it widens to f32 (exactly, in every case).
pub(super) trait Elem: 'static {
    /// The stored type.
    type T: Copy + 'static;
    /// Which one it is (kernels branch on it at compile time).
    const KIND: ElemKind;
    /// One element as f32.
    fn to_f32(x: Self::T) -> f32;
    /// Widens `src` into `dst` (`dst.len() >= src.len()`) with `K`'s kernels.
    ///
    /// # Safety
    /// The CPU features `K` needs must be present.
    unsafe fn widen<K: Kernels>(src: &[Self::T], dst: &mut [f32]);
}

/// f32 cache elements.
pub(super) struct F32E;
/// f16 cache elements.
pub(super) struct F16E;
/// bf16 cache elements.
pub(super) struct Bf16E;

impl Elem for F32E {
    type T = f32;
    const KIND: ElemKind = ElemKind::F32;
    #[inline(always)]
    fn to_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn widen<K: Kernels>(src: &[f32], dst: &mut [f32]) {
        dst[..src.len()].copy_from_slice(src);
    }
}

impl Elem for F16E {
    type T = u16;
    const KIND: ElemKind = ElemKind::F16;
    #[inline(always)]
    fn to_f32(x: u16) -> f32 {
        half::f16::from_bits(x).to_f32()
    }
    #[inline(always)]
    unsafe fn widen<K: Kernels>(src: &[u16], dst: &mut [f32]) {
        // SAFETY: the caller guarantees `K`'s features.
        unsafe { K::f16_to_f32(src, dst) }
    }
}

impl Elem for Bf16E {
    type T = u16;
    const KIND: ElemKind = ElemKind::Bf16;
    #[inline(always)]
    fn to_f32(x: u16) -> f32 {
        f32::from_bits((x as u32) << 16)
    }
    #[inline(always)]
    unsafe fn widen<K: Kernels>(src: &[u16], dst: &mut [f32]) {
        // SAFETY: the caller guarantees `K`'s features.
        unsafe { K::bf16_to_f32(src, dst) }
    }
}

/// A tile of keys in transposed form: up to two groups of 16 keys, element `(i, j)` (dimension
/// `i < d`, key `j < 16`) of group `g` at `groups[g] + i * stride + j`.
#[derive(Clone, Copy)]
pub(super) struct KtTile<T> {
    /// First element of each group (only the first `n_groups` are read).
    pub groups: [*const T; 2],
    /// 1 or 2.
    pub n_groups: usize,
    /// Elements between dimension `i` and `i + 1` of a key (`>= 16`).
    pub stride: usize,
}

/// The vector kernels of one instruction set. Every method is `unsafe` because an
/// implementation may require CPU features: call it only where they are present.
pub(super) trait Kernels {
    /// Scaled scores of a lane block against a key tile: `out[l * TILE + j] = scale *
    /// Σ_i q[l*d + i] * k_j[i]` for every lane `l < q.len() / d` and key `j < 16 * n_groups`,
    /// the sum being one chain over `i = 0..d` (so a score never depends on the other lanes).
    ///
    /// # Safety
    /// `K`'s features; `kt` readable as [`KtTile`] says for `d` dimensions; `out` holds
    /// `(lanes - 1) * TILE + 16 * n_groups` floats.
    unsafe fn scores<E: Elem>(q: &[f32], d: usize, kt: KtTile<E::T>, scale: f32, out: &mut [f32]);
    /// Weighted values of a tile: `acc_l = acc_l * corr[l] + Σ_j w[l * TILE + j] * rows[j]`
    /// for every lane `l < acc.len() / d`, one chain over `j` per element.
    ///
    /// # Safety
    /// `K`'s features; every `rows[j]` readable for `d` elements; `rows.len() <= TILE`;
    /// `w` holds `(lanes - 1) * TILE + rows.len()` floats and `corr` `lanes`.
    unsafe fn pv<E: Elem>(acc: &mut [f32], d: usize, corr: &[f32], w: &[f32], rows: &[*const E::T]);
    /// Hints that the cache lines of `bytes` bytes from `p` will be read soon (no-op where the
    /// instruction set has no hint).
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, bytes: usize) {
        let _ = (p, bytes);
    }
    /// The largest element (`-inf` for none).
    unsafe fn max(s: &[f32]) -> f32;
    /// `s = exp(s - m)` (every `s <= m`), returning the sum.
    unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32;
    /// Widens f16 bit patterns to f32; `dst.len() >= src.len()`.
    unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]);
    /// Widens bf16 bit patterns to f32; `dst.len() >= src.len()`.
    unsafe fn bf16_to_f32(src: &[u16], dst: &mut [f32]);
}

/// Portable kernels, for any CPU.
pub(super) struct Scalar;

impl Kernels for Scalar {
    unsafe fn scores<E: Elem>(q: &[f32], d: usize, kt: KtTile<E::T>, scale: f32, out: &mut [f32]) {
        for (l, ql) in q.chunks_exact(d).enumerate() {
            for g in 0..kt.n_groups {
                for j in 0..16 {
                    let mut s = 0f32;
                    for (i, &x) in ql.iter().enumerate() {
                        // SAFETY: the caller guarantees `kt` is readable for `d` dimensions.
                        let k = unsafe { *kt.groups[g].add(i * kt.stride + j) };
                        s += x * E::to_f32(k);
                    }
                    out[l * TILE + 16 * g + j] = scale * s;
                }
            }
        }
    }

    unsafe fn pv<E: Elem>(
        acc: &mut [f32],
        d: usize,
        corr: &[f32],
        w: &[f32],
        rows: &[*const E::T],
    ) {
        for (l, a) in acc.chunks_exact_mut(d).enumerate() {
            a.iter_mut().for_each(|x| *x *= corr[l]);
            for (j, &row) in rows.iter().enumerate() {
                let wj = w[l * TILE + j];
                // SAFETY: the caller guarantees every row is readable for `d` elements.
                let row = unsafe { std::slice::from_raw_parts(row, d) };
                a.iter_mut()
                    .zip(row)
                    .for_each(|(x, &v)| *x += wj * E::to_f32(v));
            }
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

/// Folds one chunk's softmax state (`m`, `l`, unnormalised `o`) into a running merge (`mm`,
/// `ml`, `mo`): the first non-empty chunk is copied, later ones rescaled to the larger
/// maximum. Plain element-wise f32 (no fused multiply-add), so the merge of a lane is the same
/// computation wherever it runs.
#[inline(always)]
pub(super) fn fold(mm: &mut f32, ml: &mut f32, mo: &mut [f32], m: f32, l: f32, o: &[f32]) {
    if m == f32::NEG_INFINITY {
        return;
    }
    if *mm == f32::NEG_INFINITY {
        (*mm, *ml) = (m, l);
        mo.copy_from_slice(o);
        return;
    }
    let nm = mm.max(m);
    let (a, b) = ((*mm - nm).exp(), (m - nm).exp());
    *ml = *ml * a + l * b;
    for (x, &y) in mo.iter_mut().zip(o) {
        *x = *x * a + y * b;
    }
    *mm = nm;
}

/// `out = o / l` (zeros when nothing was seen).
#[inline(always)]
pub(super) fn normalise(out: &mut [f32], l: f32, o: &[f32]) {
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    for (x, &a) in out.iter_mut().zip(o) {
        *x = a * inv;
    }
}

/// The attention of one lane set (see the module docs of [`super`]) over the caches `kc` and
/// `vc`: written, normalised, into its output rows ([`Target::Output`]), or as one chunk's raw
/// state into its partial region ([`Target::Chunk`]).
///
/// Scratch layout: `q [lanes*d] | acc [lanes*d] | merged acc [lanes*d] | scores [lanes*TILE]
/// | m, l, corr, merged m, merged l [lanes each] | key tile [TILE*d] | value tile [TILE*d]`.
///
/// # Safety
/// The CPU features `K` needs must be present; `kc` and `vc` are the layer's caches and `set`
/// comes from a checked call (its rows, blocks and output or partial region in range and owned
/// by this lane set alone).
#[inline(always)]
pub(super) unsafe fn attend<K: Kernels, E: Elem>(
    set: &LaneSet<'_>,
    kc: &[E::T],
    vc: &[E::T],
    scratch: &mut Vec<f32>,
) {
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
    let need = 3 * lanes * d + lanes * TILE + 5 * lanes + 2 * TILE * d;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (q, rest) = scratch.split_at_mut(lanes * d);
    let (acc, rest) = rest.split_at_mut(lanes * d);
    let (mo, rest) = rest.split_at_mut(lanes * d);
    let (s, rest) = rest.split_at_mut(lanes * TILE);
    let (m, rest) = rest.split_at_mut(lanes);
    let (l, rest) = rest.split_at_mut(lanes);
    let (corr, rest) = rest.split_at_mut(lanes);
    let (mm, rest) = rest.split_at_mut(lanes);
    let (ml, rest) = rest.split_at_mut(lanes);
    let (kbuf, rest) = rest.split_at_mut(TILE * d);
    let vbuf = &mut rest[..TILE * d];

    let seq = set.seq;
    for r in 0..rows {
        let t = seq.query_start + set.row0 + r;
        q[r * group * d..][..group * d]
            .copy_from_slice(&step.q[(t * h + set.kv_head * group) * d..][..group * d]);
    }
    acc.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    mm.fill(f32::NEG_INFINITY);
    ml.fill(0.0);

    // Row `r` of the set (token `seq.query_start + row0 + r`) sees positions `< vis0 + r`.
    let vis0 = seq.context_len - seq.query_len + set.row0 + 1;
    let end = vis0 + rows - 1;
    let (begin, stop) = match set.target {
        Target::Chunk { chunk, .. } => (chunk * CHUNK, ((chunk + 1) * CHUNK).min(end)),
        Target::Output => (0, end),
    };
    // Start of this head's `[d, bs]` keys and `[bs, d]` values in logical block `b`.
    let base = |b: usize| (seq.block_table[b] as usize * hkv + set.kv_head) * bs * d;
    let mut vrows = [std::ptr::null::<E::T>(); TILE];
    let mut wrows = [std::ptr::null::<f32>(); TILE];

    let mut p0 = begin;
    while p0 < stop {
        if p0 > begin && p0.is_multiple_of(CHUNK) {
            // A chunk ends: fold every lane's state into its merge, start afresh.
            for lane in 0..lanes {
                let o = &acc[lane * d..][..d];
                fold(
                    &mut mm[lane],
                    &mut ml[lane],
                    &mut mo[lane * d..][..d],
                    m[lane],
                    l[lane],
                    o,
                );
            }
            acc.fill(0.0);
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
        }
        let n = (p0 + TILE).min(stop) - p0;
        // Small lane sets (decode) stream the cache: ask for the next tile's blocks now.
        if lanes - (p0 + 1).saturating_sub(vis0) * group <= PREFETCH_LANES && p0 + TILE < stop {
            let next = p0 + TILE;
            let (b0, b1) = (next / bs, ((next + TILE).min(stop) - 1) / bs);
            let size = std::mem::size_of::<E::T>();
            for b in b0..=b1 {
                let start = base(b);
                // SAFETY: a hint only; the range is one head of a block of the cache.
                unsafe {
                    K::prefetch(kc[start..].as_ptr() as *const u8, bs * d * size);
                    K::prefetch(vc[start..].as_ptr() as *const u8, bs * d * size);
                }
            }
        }
        // Lanes of rows that see none of this tile are skipped (causal mask).
        let ls = (p0 + 1).saturating_sub(vis0) * group;
        let widen = E::KIND != ElemKind::F32 && lanes - ls > WIDEN_LANES;
        let n_groups = n.div_ceil(16);

        // Scores, lane-major: keys read in place when each group of 16 lies in one block, else
        // widened or gathered into the key tile.
        let (qs, ss) = (&q[ls * d..], &mut s[ls * TILE..]);
        if bs.is_multiple_of(16) && !widen {
            let groups = [0, 1].map(|g| {
                let p = p0 + 16 * g.min(n_groups - 1);
                kc[base(p / bs) + p % bs..].as_ptr()
            });
            let kt = KtTile {
                groups,
                n_groups,
                stride: bs,
            };
            // SAFETY: each group's 16 keys lie in one block (`bs % 16 == 0`, `p0 % 16 == 0`),
            // whose `d` rows of `bs` elements are in the cache (blocks checked).
            unsafe { K::scores::<E>(qs, d, kt, scale, ss) };
        } else {
            if bs.is_multiple_of(16) {
                for g in 0..n_groups {
                    let p = p0 + 16 * g;
                    let src = &kc[base(p / bs) + p % bs..];
                    for i in 0..d {
                        let dst = &mut kbuf[(g * d + i) * 16..][..16];
                        // SAFETY: the caller guarantees `K`'s features.
                        unsafe { E::widen::<K>(&src[i * bs..][..16], dst) };
                    }
                }
            } else {
                for j in 0..n {
                    let p = p0 + j;
                    let src = &kc[base(p / bs) + p % bs..];
                    for i in 0..d {
                        kbuf[((j / 16) * d + i) * 16 + j % 16] = E::to_f32(src[i * bs]);
                    }
                }
            }
            let kt = KtTile {
                groups: [kbuf.as_ptr(), kbuf[16 * d..].as_ptr()],
                n_groups,
                stride: 16,
            };
            // SAFETY: the key tile holds two groups of `d` rows of 16 floats.
            unsafe { K::scores::<super::kernel::F32E>(qs, d, kt, scale, ss) };
        }

        // Online softmax update: rescale by the new maximum, turn scores into weights.
        for lane in ls..lanes {
            let visible = (vis0 + lane / group - p0).min(n);
            // Weights of positions this lane does not see are 0 (they are finite cache rows).
            s[lane * TILE + visible..lane * TILE + n].fill(0.0);
            let sl = &mut s[lane * TILE..][..visible];
            // SAFETY: the caller guarantees `K`'s features.
            let new_m = m[lane].max(unsafe { K::max(sl) });
            corr[lane] = 1.0;
            if new_m > m[lane] {
                let c = (m[lane] - new_m).exp();
                l[lane] *= c;
                corr[lane] = c;
                m[lane] = new_m;
            }
            // SAFETY: the caller guarantees `K`'s features.
            l[lane] += unsafe { K::exp_sum(sl, new_m) };
        }

        // Weighted values: the tile's rows (in place, or widened once for many lanes), a run
        // of consecutive slots of one block at a time.
        let (mut blk, mut within, mut j) = (p0 / bs, p0 % bs, 0);
        while j < n {
            let run = (bs - within).min(n - j);
            let block = &vc[base(blk) + within * d..][..run * d];
            for row in block.chunks_exact(d) {
                if widen {
                    let dst = &mut vbuf[j * d..][..d];
                    // SAFETY: the caller guarantees `K`'s features.
                    unsafe { E::widen::<K>(row, dst) };
                    wrows[j] = dst.as_ptr();
                } else {
                    vrows[j] = row.as_ptr();
                }
                j += 1;
            }
            (blk, within) = (blk + 1, 0);
        }
        let (a, c, w) = (&mut acc[ls * d..], &corr[ls..], &s[ls * TILE..]);
        // SAFETY: the rows are `d` elements of the cache or of the value tile.
        unsafe {
            match widen {
                true => K::pv::<super::kernel::F32E>(a, d, c, w, &wrows[..n]),
                false => K::pv::<E>(a, d, c, w, &vrows[..n]),
            }
        }
        p0 += n;
    }

    match set.target {
        Target::Chunk { partial, .. } => {
            // SAFETY: the partial region of this lane set holds `lanes * (d + 2)` floats that
            // no other item touches (laid out by `forward`).
            let part = unsafe { std::slice::from_raw_parts_mut(partial.0, lanes * (d + 2)) };
            for (lane, p) in part.chunks_exact_mut(d + 2).enumerate() {
                (p[0], p[1]) = (m[lane], l[lane]);
                p[2..].copy_from_slice(&acc[lane * d..][..d]);
            }
        }
        Target::Output => {
            for r in 0..rows {
                let t = seq.query_start + set.row0 + r;
                let start = (t * h + set.kv_head * group) * d;
                debug_assert!(start + group * d <= step.out_len);
                // SAFETY: `check_seqs` keeps `t < num_tokens`, so the region is inside the
                // output, and no other lane set writes heads `kv_head * group ..` of token `t`.
                let out =
                    unsafe { std::slice::from_raw_parts_mut(step.out.0.add(start), group * d) };
                for g in 0..group {
                    let lane = r * group + g;
                    let (o, a) = (&mut out[g * d..][..d], &acc[lane * d..][..d]);
                    if mm[lane] == f32::NEG_INFINITY {
                        normalise(o, l[lane], a);
                    } else {
                        let mo = &mut mo[lane * d..][..d];
                        fold(&mut mm[lane], &mut ml[lane], mo, m[lane], l[lane], a);
                        normalise(o, ml[lane], mo);
                    }
                }
            }
        }
    }
}
