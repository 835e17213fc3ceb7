//! The LoRA half of a linear on the flattened batch: after the base product, each token row
//! whose request has an adapter gets `Δy = (x·Aᵀ)·(s·B)ᵀ` from its slot (Punica's shrink then
//! expand, on the CPU). Rows of the base model are skipped; a step without adapters never
//! gets here. Every row is computed on its own in a fixed order, so a row's result does not
//! depend on what else is in the batch, and nothing is allocated (the shrink result of one row
//! lives on the stack).

use trellis_kernels::{lora, pool};
use trellis_plugin::{LoraMapping, LoraTarget, NO_LORA_SLOT};

/// Largest rank a slot may hold (vLLM's largest `--max-lora-rank` choice).
pub const MAX_SUPPORTED_RANK: usize = 512;

/// `out[r, offset..offset+n] += Δy` for each row `r` of `x` (`[rows, k]`) whose slot holds an
/// adapter that targets `target` of `layer`; `out` has rows of `width` values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_lora(
    lora: Option<LoraMapping<'_>>,
    layer: usize,
    target: LoraTarget,
    x: &[f32],
    k: usize,
    out: &mut [f32],
    width: usize,
    offset: usize,
) {
    let Some(map) = lora else { return };
    let Some(m) = map.pool.module(layer, target) else {
        return;
    };
    let n = m.out_features();
    if k != m.in_features() || width == 0 || offset + n > width || x.len() / k != out.len() / width
    {
        return;
    }
    let slots = map.token_slots;
    if !slots.iter().any(|&s| s != NO_LORA_SLOT) {
        return;
    }
    pool::global().for_rows_mut(out, width, |r0, rows| {
        let mut t = [0f32; MAX_SUPPORTED_RANK];
        for (i, row) in rows.chunks_mut(width).enumerate() {
            let r = r0 + i;
            let Some(&slot) = slots.get(r) else { continue };
            if slot == NO_LORA_SLOT {
                continue;
            }
            let Some((rank, a, b_t)) = m.weights(slot as usize) else {
                continue;
            };
            let t = &mut t[..rank];
            lora::shrink(&x[r * k..][..k], a, t);
            lora::expand(t, b_t, &mut row[offset..offset + n]);
        }
    });
}

/// The LoRA-capable linears of Llama-family decoder layers. With interleaved RoPE (GGUF), the
/// q and k rows are in llama.cpp's permuted order, which an adapter's `lora_B` must follow.
pub fn decoder_lora_modules(
    layers: &[super::DecoderLayer],
    rope: super::RopeStyle,
) -> Vec<trellis_plugin::LoraModuleSpec> {
    let permuted = rope == super::RopeStyle::Interleaved;
    let mut specs = Vec::with_capacity(layers.len() * LoraTarget::ALL.len());
    for (i, l) in layers.iter().enumerate() {
        let c = l.self_attn.cfg;
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let inter = l.mlp.intermediate;
        for (target, inp, out, heads) in [
            (LoraTarget::QProj, h, q, Some(c.num_heads)),
            (LoraTarget::KProj, h, kv, Some(c.num_kv_heads)),
            (LoraTarget::VProj, h, kv, None),
            (LoraTarget::OProj, q, h, None),
            (LoraTarget::GateProj, h, inter, None),
            (LoraTarget::UpProj, h, inter, None),
            (LoraTarget::DownProj, inter, h, None),
        ] {
            specs.push(trellis_plugin::LoraModuleSpec {
                layer: i,
                target,
                in_features: inp,
                out_features: out,
                permute_heads: heads.filter(|_| permuted),
            });
        }
    }
    specs
}
