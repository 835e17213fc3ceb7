//! Incremental detokenization and stop strings, as vLLM's output processor does them.
//!
//! [`IncrementalDetokenizer`] turns a growing list of token ids into text deltas. Decoding
//! one token at a time is wrong in two ways: a character split over several byte-level tokens
//! would show up as U+FFFD, and tokenizers whose decoders look at neighbours (SentencePiece's
//! leading-space rule) would lose spaces. So, like vLLM and TGI, it keeps two offsets into
//! the ids: text is decoded from `prefix_offset` (a little context before the unread tokens)
//! once up to `read_offset` and once to the end; the difference is the new text, emitted only
//! when it does not end in U+FFFD (an incomplete character).
//!
//! [`StopChecker`] finds stop strings in the accumulated output text (so a stop string split
//! over several tokens is found) and decides how much text may be streamed now.

use crate::tokenizer::Tokenizer;

/// How many prompt tokens to keep as decoding context before the first generated token
/// (vLLM's `INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`).
const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Streams text from token ids, never splitting a character.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// Ids from `prefix_offset`'s context onward (older ones are dropped as they stop mattering).
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
    output_text: String,
}

impl IncrementalDetokenizer {
    /// Starts a detokenizer. `prompt_ids` gives decoding context (only its last few tokens are
    /// kept) so that the first generated token decodes as it would after the prompt; prompt
    /// text itself is never emitted.
    pub fn new(prompt_ids: Option<&[u32]>, skip_special_tokens: bool) -> Self {
        let prompt = prompt_ids.unwrap_or(&[]);
        let ids = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..].to_vec();
        let read_offset = ids.len();
        Self {
            ids,
            prefix_offset: 0,
            read_offset,
            skip_special_tokens,
            output_text: String::new(),
        }
    }

    /// Appends generated ids and returns the newly completed text (possibly empty, when the
    /// ids so far end inside a multi-byte character or are skipped special tokens).
    pub fn push(&mut self, tokenizer: &Tokenizer, new_ids: &[u32]) -> String {
        self.ids.extend_from_slice(new_ids);
        self.decode_pending(tokenizer, false)
    }

    /// Emits whatever is still held back (an incomplete character at the end of generation
    /// is emitted as U+FFFD, as a full decode would show it). Call once when the request ends.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        self.decode_pending(tokenizer, true)
    }

    /// All text emitted so far.
    pub fn output_text(&self) -> &str {
        &self.output_text
    }

    fn decode_pending(&mut self, tokenizer: &Tokenizer, force: bool) -> String {
        if self.read_offset >= self.ids.len() {
            return String::new();
        }
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, self.skip_special_tokens)
                .unwrap_or_default()
        };
        let prefix_text = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let new_text = decode(&self.ids[self.prefix_offset..]);
        if new_text.len() <= prefix_text.len() || (!force && new_text.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let delta = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(d) => d.to_string(),
            // The decoder changed earlier text (rare); emit what follows the common prefix.
            None => new_text[common_prefix_len(&prefix_text, &new_text)..].to_string(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Ids before prefix_offset no longer influence any decode: drop them.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        self.output_text.push_str(&delta);
        delta
    }
}

/// Byte length of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// What [`StopChecker::check`] decided for one step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopCheck {
    /// Text to stream now (never includes text already returned by an earlier call).
    pub text: String,
    /// The stop string that matched, when generation must stop.
    pub stop: Option<String>,
    /// When stopping: the byte length the accumulated output text must be truncated to
    /// (before the stop string, or after it with `include_stop_str_in_output`).
    pub truncate_to: Option<usize>,
}

/// Finds stop strings in the accumulated output and decides what can be streamed.
///
/// Rules:
/// - The search runs on the accumulated text, over the window where a match could end in the
///   new delta, so a stop string spread over several tokens is found.
/// - When several stop strings match, the one that starts earliest wins (the longest on a tie).
///   vLLM takes the first in list order that matches; "earliest" is what a user reading the
///   text expects and differs only when two stop strings match within one step.
/// - The output is trimmed before the stop string, or just after it with
///   `include_stop_str_in_output`.
/// - Hold-back while streaming: vLLM always holds back `max(len(stop)) - 1` characters. This
///   holds back only the longest suffix of the text that is a proper prefix of some stop
///   string (at most `max(len(stop)) - 1` bytes), so ordinary text streams at once and text
///   that may yet become a stop string is never emitted. Nothing is held back with
///   `include_stop_str_in_output` (nothing would be trimmed) or when `finished`.
#[derive(Debug, Clone)]
pub struct StopChecker {
    stop: Vec<String>,
    include_stop_str_in_output: bool,
    max_stop_len: usize,
    /// Byte length of the output text already returned.
    emitted: usize,
    stopped: bool,
}

impl StopChecker {
    /// A checker for `stop` (empty strings are ignored).
    pub fn new(stop: Vec<String>, include_stop_str_in_output: bool) -> Self {
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let max_stop_len = stop.iter().map(String::len).max().unwrap_or(0);
        Self {
            stop,
            include_stop_str_in_output,
            max_stop_len,
            emitted: 0,
            stopped: false,
        }
    }

    /// Whether a stop string has been found.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Checks the accumulated `output_text`, whose last `delta_len` bytes are new since the
    /// previous call. `finished` says generation ended for another reason (EOS, length), so
    /// nothing needs holding back. After a stop, further calls return nothing.
    pub fn check(&mut self, output_text: &str, delta_len: usize, finished: bool) -> StopCheck {
        if self.stopped {
            return StopCheck::default();
        }
        let len = output_text.len();
        if let Some((start, stop)) = self.find_stop(output_text, delta_len) {
            let stop = stop.to_string();
            let end = if self.include_stop_str_in_output {
                start + stop.len()
            } else {
                start
            };
            let text = output_text
                .get(self.emitted..end)
                .unwrap_or_default()
                .to_string();
            self.emitted = self.emitted.max(end);
            self.stopped = true;
            return StopCheck {
                text,
                stop: Some(stop),
                truncate_to: Some(end),
            };
        }
        let hold = if finished || self.include_stop_str_in_output {
            0
        } else {
            self.partial_suffix_len(output_text)
        };
        let upto = len - hold;
        let text = output_text
            .get(self.emitted..upto)
            .unwrap_or_default()
            .to_string();
        self.emitted = self.emitted.max(upto);
        StopCheck {
            text,
            stop: None,
            truncate_to: None,
        }
    }

    /// The earliest stop-string match that ends within the last `delta_len` bytes.
    fn find_stop(&self, text: &str, delta_len: usize) -> Option<(usize, &str)> {
        let new_start = text.len().saturating_sub(delta_len);
        let mut window = new_start.saturating_sub(self.max_stop_len.saturating_sub(1));
        while !text.is_char_boundary(window) {
            window -= 1;
        }
        let hay = &text[window..];
        let mut best: Option<(usize, &str)> = None;
        for s in &self.stop {
            // First occurrence in the window that ends inside the new text.
            let mut from = 0;
            while let Some(pos) = hay[from..].find(s.as_str()) {
                let start = window + from + pos;
                if start + s.len() > new_start {
                    let better = match best {
                        None => true,
                        Some((b, bs)) => start < b || (start == b && s.len() > bs.len()),
                    };
                    if better {
                        best = Some((start, s.as_str()));
                    }
                    break;
                }
                from += pos + hay[from + pos..].chars().next().map_or(1, char::len_utf8);
            }
        }
        best
    }

    /// Length of the longest suffix of `text` that is a proper prefix of a stop string.
    fn partial_suffix_len(&self, text: &str) -> usize {
        let mut min_start = text
            .len()
            .saturating_sub(self.max_stop_len.saturating_sub(1));
        while !text.is_char_boundary(min_start) {
            min_start += 1;
        }
        text[min_start..]
            .char_indices()
            .map(|(i, _)| &text[min_start + i..])
            .find(|suffix| {
                self.stop
                    .iter()
                    .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .map_or(0, str::len)
    }
}
