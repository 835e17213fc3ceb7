//! The pooling head (vLLM's `Pooler`): one vector per sequence out of its tokens' hidden
//! states, optionally L2-normalised.

/// How a sequence's hidden states become one vector (vLLM's `PoolingType`, plus
/// sentence-transformers' `max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingType {
    /// The first token's hidden state (BERT's `[CLS]`).
    Cls,
    /// The mean over the tokens.
    Mean,
    /// The last token's hidden state (decoder models turned into embedding models).
    Last,
    /// The element-wise maximum over the tokens.
    Max,
}

impl PoolingType {
    /// Parses vLLM's and sentence-transformers' names (`MEAN`, `mean`, `cls`, `lasttoken`, ...).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "cls" => Some(Self::Cls),
            "mean" | "mean_tokens" => Some(Self::Mean),
            "last" | "lasttoken" | "last_token" => Some(Self::Last),
            "max" | "max_tokens" => Some(Self::Max),
            _ => None,
        }
    }

    /// vLLM's upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cls => "CLS",
            Self::Mean => "MEAN",
            Self::Last => "LAST",
            Self::Max => "MAX",
        }
    }
}

/// A pooling head: the pooling type and whether the result is L2-normalised by default (a
/// request's `normalize` overrides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooler {
    /// How tokens are combined.
    pub pooling_type: PoolingType,
    /// Whether embeddings are L2-normalised unless the request says otherwise.
    pub normalize: bool,
}

impl Pooler {
    /// Pools the hidden states `hidden` (`[n, hidden_size]` row-major, `n ≥ 1`) of one
    /// sequence into `hidden_size` values, normalised when `normalize`. Each output depends on
    /// this sequence's rows only, in a fixed order: the same tokens give the same bits in any
    /// batch.
    pub fn pool(&self, hidden: &[f32], hidden_size: usize, normalize: bool) -> Vec<f32> {
        let h = hidden_size.max(1);
        let n = hidden.len() / h;
        let rows = hidden.chunks_exact(h);
        let mut out: Vec<f32> = match (self.pooling_type, n) {
            (_, 0) => vec![0.0; hidden_size],
            (PoolingType::Cls, _) => hidden[..h].to_vec(),
            (PoolingType::Last, _) => hidden[(n - 1) * h..n * h].to_vec(),
            (PoolingType::Mean, _) => {
                let mut sum = vec![0f64; h];
                for row in rows {
                    sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
                }
                sum.iter().map(|&s| (s / n as f64) as f32).collect()
            }
            (PoolingType::Max, _) => {
                let mut max = vec![f32::NEG_INFINITY; h];
                for row in rows {
                    max.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
                }
                max
            }
        };
        if normalize {
            l2_normalize(&mut out);
        }
        out
    }
}

/// `v / max(‖v‖₂, 1e-12)` in place (PyTorch's `F.normalize`, which sentence-transformers'
/// `Normalize` module and vLLM use), the norm accumulated in f64.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    let norm = norm.max(1e-12);
    v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_types() {
        let h = [1.0f32, -2.0, 3.0, 4.0, 5.0, -6.0];
        let p = |t| Pooler {
            pooling_type: t,
            normalize: false,
        };
        assert_eq!(p(PoolingType::Cls).pool(&h, 2, false), [1.0, -2.0]);
        assert_eq!(p(PoolingType::Last).pool(&h, 2, false), [5.0, -6.0]);
        assert_eq!(p(PoolingType::Mean).pool(&h, 2, false), [3.0, -4.0 / 3.0]);
        assert_eq!(p(PoolingType::Max).pool(&h, 2, false), [5.0, 4.0]);
        let n = p(PoolingType::Cls).pool(&[3.0, 4.0], 2, true);
        assert!((n[0] - 0.6).abs() < 1e-7 && (n[1] - 0.8).abs() < 1e-7);
        assert_eq!(p(PoolingType::Cls).pool(&[0.0, 0.0], 2, true), [0.0, 0.0]);
    }

    #[test]
    fn names() {
        assert_eq!(PoolingType::parse("MEAN"), Some(PoolingType::Mean));
        assert_eq!(PoolingType::parse("lasttoken"), Some(PoolingType::Last));
        assert_eq!(PoolingType::parse("weightedmean"), None);
    }
}
