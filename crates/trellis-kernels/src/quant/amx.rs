//! AMX-INT8 tiles for batches of 16 rows or more (prefill, large decode batches).
//!
//! Per column group and block of 32 inputs, one `tdpbusd` computes the 16 rows × 16 columns of
//! integer sums: A = 16 activation rows of 32 bytes as `u8` (`a + 128`, kept next to the i8
//! quants by [`QActs`]), B = the group's 8 × 64-byte step vectors — the repacked layout *is*
//! AMX's B layout — with the weights as `i8` (nibbles 0..16; Q8_0 back to signed). The
//! `+128` is removed exactly with the column sums `128·Σw`, Q4_0's `−8·Σa` as elsewhere, and the
//! same per-block float expression as the other tiles runs on the 16 rows: the results are the
//! reference's bits. Rows beyond the last full 16 go to the AVX-512 tile.
//!
//! Rust has no stable AMX intrinsics; the five instructions are inline assembly. The tile
//! configuration is loaded per call and released at the end (tile state is per thread).

use std::arch::asm;
use std::arch::x86_64::*;

use super::{COLS, QActs, QK, QType};

/// The 64-byte tile configuration (palette 1), two sets so that one block's tile product runs
/// while the previous block's sums are scaled: tmm0/tmm3 = C (16 × 64 B), tmm1/tmm4 = A
/// (16 × 32 B), tmm2/tmm5 = B (8 × 64 B).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

fn config() -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1; // palette
    let colsb = |c: &mut [u8; 64], t: usize, v: u16| {
        c[16 + 2 * t..18 + 2 * t].copy_from_slice(&v.to_le_bytes())
    };
    for set in [0, 3] {
        colsb(&mut c, set, 64);
        colsb(&mut c, set + 1, 32);
        colsb(&mut c, set + 2, 64);
        c[48 + set] = 16;
        c[49 + set] = 16;
        c[50 + set] = 8;
    }
    TileConfig(c)
}

/// Unpacks one group's blocks into `buf` as AMX B tiles (`kb` × 512 bytes of `i8`) and their
/// column sums `Σw` into `colsum` (`kb` × 16).
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; `w` is one repacked group of `kb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack_group(
    qtype: QType,
    w: &[u8],
    kb: usize,
    buf: &mut Vec<u8>,
    colsum: &mut Vec<i32>,
) {
    let gbb = qtype.group_block_bytes();
    buf.resize(kb * 512, 0);
    colsum.resize(kb * COLS, 0);
    let nib = _mm512_set1_epi8(0x0F);
    let flip = _mm512_set1_epi8(-128);
    let ones = _mm512_set1_epi8(1);
    for b in 0..kb {
        let src = &w[b * gbb..][..gbb];
        let mut v = [_mm512_setzero_si512(); 8];
        // SAFETY: the loads stay inside the block (`gbb` ≥ 256 or 512 bytes of quants).
        unsafe {
            if qtype == QType::Q8_0 {
                for (s, v) in v.iter_mut().enumerate() {
                    *v = _mm512_xor_si512(
                        _mm512_loadu_si512(src.as_ptr().add(64 * s) as *const _),
                        flip,
                    );
                }
            } else {
                for j in 0..4 {
                    let raw = _mm512_loadu_si512(src.as_ptr().add(64 * j) as *const _);
                    v[j] = _mm512_and_si512(raw, nib);
                    v[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
                }
            }
        }
        let mut sum = _mm512_setzero_si512();
        for (s, v) in v.iter().enumerate() {
            sum = _mm512_dpbusd_epi32(sum, ones, *v);
            // SAFETY: 64 bytes into the block's 512 of `buf` (resized above).
            unsafe { _mm512_storeu_si512(buf.as_mut_ptr().add(b * 512 + 64 * s) as *mut _, *v) };
        }
        // SAFETY: 16 i32 into the block's 16 of `colsum`.
        unsafe { _mm512_storeu_si512(colsum.as_mut_ptr().add(b * COLS) as *mut _, sum) };
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<i32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// One group × the rows `r0..r0 + 16·tiles`: calls `emit(row0, tile)` with each finished
/// 16 × 16 tile of outputs.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI and AMX-INT8 granted (`Isa::Amx`); `w` is one repacked group of
/// `qtype` for `acts.k` inputs; `acts` has its `u8` copy and rows up to `r0 + 16·tiles`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn group_rows(
    qtype: QType,
    w: &[u8],
    acts: &QActs,
    r0: usize,
    tiles: usize,
    emit: &mut dyn FnMut(usize, &[f32; COLS * 16]),
) {
    let k = acts.k;
    let kb = k / QK;
    let qb = qtype.quant_bytes();
    let gbb = qtype.group_block_bytes();
    debug_assert!(acts.qs_u8.len() >= (r0 + 16 * tiles) * k);
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (buf, colsum) = &mut *guard;
        // SAFETY: forwarded from the caller.
        unsafe { unpack_group(qtype, w, kb, buf, colsum) };
        let cfg = config();
        let mut cs = [[0i32; COLS * 16]; 2];
        let mut out = [0f32; COLS * 16];
        // SAFETY: AMX is granted (caller); the configuration is valid for palette 1.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        for tile in 0..tiles {
            let row0 = r0 + 16 * tile;
            let mut acc = [_mm512_setzero_ps(); 16];
            // Block b's integer sums land in c[b % 2]; block b + 1's product is issued before
            // block b's sums are scaled.
            let issue = |b: usize, c: &mut [i32; COLS * 16]| {
                let a = acts.qs_u8[row0 * k + b * QK..].as_ptr();
                let bt = buf[b * 512..].as_ptr();
                // SAFETY: A reads 16 rows of 32 bytes at stride k inside `qs_u8`; B reads 8
                // rows of 64 bytes inside `buf`; C writes 16 rows of 64 bytes into `c`.
                unsafe {
                    if b.is_multiple_of(2) {
                        asm!(
                            "tileloadd tmm1, [{a} + {sa} * 1]",
                            "tileloadd tmm2, [{b} + {sb} * 1]",
                            "tilezero tmm0",
                            "tdpbusd tmm0, tmm1, tmm2",
                            "tilestored [{c} + {sc} * 1], tmm0",
                            a = in(reg) a, sa = in(reg) k, b = in(reg) bt, sb = in(reg) 64usize,
                            c = in(reg) c.as_mut_ptr(), sc = in(reg) 64usize,
                            options(nostack),
                        )
                    } else {
                        asm!(
                            "tileloadd tmm4, [{a} + {sa} * 1]",
                            "tileloadd tmm5, [{b} + {sb} * 1]",
                            "tilezero tmm3",
                            "tdpbusd tmm3, tmm4, tmm5",
                            "tilestored [{c} + {sc} * 1], tmm3",
                            a = in(reg) a, sa = in(reg) k, b = in(reg) bt, sb = in(reg) 64usize,
                            c = in(reg) c.as_mut_ptr(), sc = in(reg) 64usize,
                            options(nostack),
                        )
                    }
                }
            };
            issue(0, &mut cs[0]);
            for b in 0..kb {
                if b + 1 < kb {
                    issue(b + 1, &mut cs[(b + 1) % 2]);
                }
                let c = &cs[b % 2];
                let blk = w[b * gbb..].as_ptr();
                // SAFETY: the scales follow the quants inside the block; `colsum` has kb × 16.
                let (dw, mw, corr) = unsafe {
                    (
                        _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(qb) as *const _)),
                        if qtype == QType::Q4_1 {
                            _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(qb + 32) as *const _))
                        } else {
                            _mm512_setzero_ps()
                        },
                        _mm512_slli_epi32::<7>(_mm512_loadu_si512(
                            colsum.as_ptr().add(b * COLS) as *const _
                        )),
                    )
                };
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let i = (row0 + r) * kb + b;
                    // SAFETY: row r of `c`.
                    let raw = unsafe { _mm512_loadu_si512(c.as_ptr().add(r * COLS) as *const _) };
                    let mut sumi = _mm512_sub_epi32(raw, corr);
                    if qtype != QType::Q4_1 {
                        let shift = if qtype == QType::Q4_0 { 3 } else { 7 };
                        // Q8_0 is stored as signed here: only Q4_0 has the `−8·Σa` term.
                        if qtype == QType::Q4_0 {
                            sumi = _mm512_sub_epi32(sumi, _mm512_set1_epi32(acts.isum[i] << shift));
                        }
                    }
                    let t = _mm512_mul_ps(
                        _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), dw),
                        _mm512_set1_ps(acts.d[i]),
                    );
                    let t = if qtype == QType::Q4_1 {
                        _mm512_add_ps(t, _mm512_mul_ps(mw, _mm512_set1_ps(acts.s[i])))
                    } else {
                        t
                    };
                    *acc_r = _mm512_add_ps(*acc_r, t);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: 16 floats into row r of the 16 × 16 tile.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * COLS), *a) };
            }
            emit(row0, &out);
        }
        // SAFETY: releases this thread's tile state.
        unsafe { asm!("tilerelease", options(nostack)) };
    });
}
