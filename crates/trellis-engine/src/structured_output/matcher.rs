//! One constrained request's grammar state: the token mask of the next step and the tokens
//! accepted so far.

use llguidance::Matcher;
use llguidance::toktrie::SimpleVob;

/// A request's llguidance matcher plus the mask computed for its next token.
#[derive(Clone)]
pub struct GrammarMatcher {
    matcher: Matcher,
    mask: Option<SimpleVob>,
}

impl std::fmt::Debug for GrammarMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarMatcher")
            .field("stopped", &self.matcher.is_stopped())
            .field("error", &self.matcher.get_error())
            .field("has_mask", &self.mask.is_some())
            .finish()
    }
}

impl GrammarMatcher {
    pub(crate) fn new(matcher: Matcher) -> Self {
        GrammarMatcher {
            matcher,
            mask: None,
        }
    }

    /// Computes the mask of the next token (only EOS once the grammar is complete). Safe to
    /// run while the model computes the logits: it reads nothing but the grammar state.
    pub fn compute_mask(&mut self) -> Result<(), String> {
        match self.matcher.compute_mask_or_eos() {
            Ok(mask) => {
                self.mask = Some(mask);
                Ok(())
            }
            Err(e) => {
                self.mask = None;
                Err(e.to_string())
            }
        }
    }

    /// True when a mask was computed for this step.
    pub fn has_mask(&self) -> bool {
        self.mask.is_some()
    }

    /// Sets every token the grammar forbids to `-inf` (ids past the mask too).
    pub fn apply_mask(&self, logits: &mut [f32]) {
        let Some(mask) = &self.mask else { return };
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (j, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << j) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// True when the grammar allows `token` now.
    pub fn is_allowed(&self, token: u32) -> bool {
        self.mask
            .as_ref()
            .is_some_and(|m| (token as usize) < m.len() && m.is_allowed(token))
    }

    /// The first token the grammar allows now (used when penalties or `min_tokens` left no
    /// allowed token with a finite logit: the grammar has the last word).
    pub fn first_allowed(&self) -> Option<u32> {
        self.mask.as_ref()?.first_bit_set().map(|t| t as u32)
    }

    /// Advances the grammar by the sampled token; the mask is used up.
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        if self.matcher.is_stopped() {
            // Complete: only EOS was allowed, and EOS ends the request (or `ignore_eos` keeps
            // it going on EOS alone).
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// True when the output so far is a complete match (EOS would be allowed).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}
