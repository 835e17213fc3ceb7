//! Turning one row of logits into a token, vLLM's way.
//!
//! Order: logit bias and the min-tokens mask, then repetition/frequency/presence penalties;
//! greedy is argmax of the result. Otherwise temperature, min-p, top-k, top-p, and a draw from
//! the request's own generator. Logprobs are taken from the raw logits (vLLM's default
//! `raw_logprobs`). Each row is processed on its own, so a token never depends on what else is
//! in the batch.

use std::collections::HashMap;

use crate::sampling_params::SamplingParams;

/// A small, fast, reproducible generator (xoshiro256** seeded by splitmix64). Each request
/// owns one, so seeded sampling gives the same tokens in any batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generator {
    s: [u64; 4],
}

impl Generator {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Generator {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A uniform number in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Log-probabilities at one position: the chosen token first, then the top ones.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PositionLogprobs {
    /// The sampled (or prompt) token and its log-probability.
    pub token_id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// Its 1-based rank in the distribution.
    pub rank: usize,
    /// The `k` most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What the sampler needs to know about a request besides its parameters.
pub struct SamplingContext<'a> {
    /// The request's parameters.
    pub params: &'a SamplingParams,
    /// Prompt token ids (for the repetition penalty).
    pub prompt_ids: &'a [u32],
    /// Generated token ids so far.
    pub output_ids: &'a [u32],
    /// EOS ids and stop token ids, masked while fewer than `min_tokens` were generated.
    pub stop_ids: &'a [u32],
}

/// Log-probabilities of `row` at `token` plus the top `k`.
pub fn position_logprobs(row: &[f32], token: u32, k: usize) -> PositionLogprobs {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let tok_logit = row
        .get(token as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    let rank = 1 + row.iter().filter(|&&l| l > tok_logit).count();
    let mut top = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let k = k.min(row.len());
        let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, cmp);
            idx.truncate(k);
        }
        idx.sort_by(cmp);
        top = idx
            .into_iter()
            .map(|i| (i, row[i as usize] - lse))
            .collect();
    }
    PositionLogprobs {
        token_id: token,
        logprob: tok_logit - lse,
        rank,
        top,
    }
}

fn apply_penalties(logits: &mut [f32], ctx: &SamplingContext<'_>) {
    let p = ctx.params;
    for (&tok, &bias) in &p.logit_bias {
        if let Some(l) = logits.get_mut(tok as usize) {
            *l += bias;
        }
    }
    if ctx.output_ids.len() < p.min_tokens {
        for &tok in ctx.stop_ids {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if p.repetition_penalty != 1.0 {
        let mut seen = std::collections::HashSet::new();
        for &tok in ctx.prompt_ids.iter().chain(ctx.output_ids) {
            if seen.insert(tok)
                && let Some(l) = logits.get_mut(tok as usize)
            {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &tok in ctx.output_ids {
            *counts.entry(tok).or_default() += 1;
        }
        for (tok, c) in counts {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

fn argmax(row: &[f32]) -> u32 {
    // The first index of the largest value (NaNs never win; a NaN first element wins, as in a
    // plain scan from it). The maximum is found in 16 independent lanes (vectorised), then
    // its first position.
    if row.first().is_none_or(|x| x.is_nan()) {
        return 0;
    }
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for (n, c) in row.chunks(16).enumerate() {
        if c.iter().fold(false, |hit, &x| hit | (x == max)) {
            let i = c.iter().position(|&x| x == max).unwrap_or(0);
            return (n * 16 + i) as u32;
        }
    }
    0
}

/// Samples one token from a row of raw logits (which it may modify in place).
pub fn sample(logits: &mut [f32], ctx: &SamplingContext<'_>, generator: &mut Generator) -> u32 {
    apply_penalties(logits, ctx);
    let p = ctx.params;
    if p.is_greedy() {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = logits
        .iter()
        .map(|&l| ((l - max) / p.temperature).exp())
        .collect();
    // min-p: relative to the most likely token (whose weight is exp(0) = 1).
    if p.min_p > 0.0 {
        for q in probs.iter_mut() {
            if *q < p.min_p {
                *q = 0.0;
            }
        }
    }
    let k = if p.top_k > 0 {
        (p.top_k as usize).min(probs.len())
    } else {
        probs.len()
    };
    if k < probs.len() || p.top_p < 1.0 {
        let mut idx: Vec<u32> = (0..probs.len() as u32)
            .filter(|&i| probs[i as usize] > 0.0)
            .collect();
        let cmp = |a: &u32, b: &u32| {
            probs[*b as usize]
                .total_cmp(&probs[*a as usize])
                .then(a.cmp(b))
        };
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, cmp);
            idx.truncate(k);
        }
        idx.sort_by(cmp);
        if p.top_p < 1.0 {
            let total: f64 = idx.iter().map(|&i| probs[i as usize] as f64).sum();
            let mut acc = 0.0;
            let mut keep = idx.len();
            for (j, &i) in idx.iter().enumerate() {
                acc += probs[i as usize] as f64;
                if acc >= p.top_p as f64 * total {
                    keep = j + 1;
                    break;
                }
            }
            idx.truncate(keep);
        }
        let mut kept = vec![0f32; probs.len()];
        for &i in &idx {
            kept[i as usize] = probs[i as usize];
        }
        probs = kept;
    }
    let total: f64 = probs.iter().map(|&q| q as f64).sum();
    if total <= 0.0 || !total.is_finite() {
        return argmax(logits);
    }
    let mut u = generator.next_f64() * total;
    let mut last = 0;
    for (i, &q) in probs.iter().enumerate() {
        if q > 0.0 {
            last = i;
            u -= q as f64;
            if u < 0.0 {
                return i as u32;
            }
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(p: &'a SamplingParams, out: &'a [u32]) -> SamplingContext<'a> {
        SamplingContext {
            params: p,
            prompt_ids: &[],
            output_ids: out,
            stop_ids: &[2],
        }
    }

    /// The lane-wise argmax is the plain scan's: first index of the maximum, ties, NaNs,
    /// infinities and lengths around the 16-lane width.
    #[test]
    fn argmax_equals_a_plain_scan() {
        fn scan(row: &[f32]) -> u32 {
            let mut best = 0;
            for (i, &l) in row.iter().enumerate() {
                if l > row[best] {
                    best = i;
                }
            }
            best as u32
        }
        let mut g = Generator::new(3);
        for len in [1usize, 2, 15, 16, 17, 31, 33, 100, 49152] {
            for case in 0..20 {
                let row: Vec<f32> = (0..len)
                    .map(|_| match g.next_u64() % 23 {
                        0 if case % 3 == 0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 if case % 5 == 0 => f32::INFINITY,
                        r => (r % 7) as f32, // many ties
                    })
                    .collect();
                assert_eq!(argmax(&row), scan(&row), "len {len} case {case}");
            }
        }
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_is_argmax_after_bias_and_min_tokens() {
        let mut p = SamplingParams::greedy(4);
        let mut g = Generator::new(0);
        assert_eq!(sample(&mut [0.0, 1.0, 3.0], &ctx(&p, &[]), &mut g), 2);
        p.min_tokens = 1;
        assert_eq!(sample(&mut [0.0, 1.0, 3.0], &ctx(&p, &[]), &mut g), 1);
        p.logit_bias.insert(0, 10.0);
        assert_eq!(sample(&mut [0.0, 1.0, 3.0], &ctx(&p, &[]), &mut g), 0);
    }

    #[test]
    fn penalties_follow_vllm() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplingParams::greedy(1)
        };
        let mut row = [4.0, -1.0, 1.0];
        apply_penalties(
            &mut row,
            &SamplingContext {
                params: &p,
                prompt_ids: &[1],
                output_ids: &[0, 0],
                stop_ids: &[],
            },
        );
        assert_eq!(row, [4.0 / 2.0 - 1.0 - 0.25, -2.0, 1.0]);
    }

    #[test]
    fn seeded_sampling_repeats_and_top_k_one_is_greedy() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let row: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut g = Generator::new(seed);
            (0..20)
                .map(|_| sample(&mut row.clone(), &ctx(&p, &[]), &mut g))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let pk = SamplingParams {
            top_k: 1,
            ..p.clone()
        };
        let mut g = Generator::new(1);
        assert_eq!(
            sample(&mut row.clone(), &ctx(&pk, &[]), &mut g),
            argmax(&row)
        );
        let pp = SamplingParams { top_p: 1e-6, ..p };
        assert_eq!(
            sample(&mut row.clone(), &ctx(&pp, &[]), &mut g),
            argmax(&row)
        );
    }

    #[test]
    fn logprobs_are_normalised_and_ranked() {
        let row = [1.0f32, 2.0, 3.0];
        let lp = position_logprobs(&row, 1, 2);
        assert_eq!(lp.rank, 2);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        let total: f32 = row
            .iter()
            .map(|&l| (l - 3.0 - (1.0f32 + (-1.0f32).exp() + (-2.0f32).exp()).ln()).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!((lp.logprob - lp.top[1].1).abs() < 1e-6);
    }
}
