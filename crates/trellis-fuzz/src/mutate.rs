//! Mutations of byte strings: the generic ones of mutational fuzzers (bit flips, boundary
//! integers written over the bytes, inserts, deletes, duplications, splices) and a few that aim
//! at text formats (huge or negative numbers, deep nesting).

/// A small, seedable PRNG (xorshift64*): the same seed gives the same run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Integers at the edges of what parsers check: sizes, counts, signs, overflow points.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// Text that breaks naive number and structure handling.
const TEXT_TOKENS: [&str; 12] = [
    "99999999999999999999",
    "-1",
    "1e308",
    "-0",
    "NaN",
    "18446744073709551616",
    "4294967296",
    "null",
    "\"\"",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":",
    "\\u0000\\ud800",
];

/// Applies one to four random mutations to `data`; `other` is another input to splice from.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        mutate_once(rng, data, other);
    }
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    let len = data.len();
    match rng.below(10) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        2 => {
            // A boundary integer over 1, 2, 4 or 8 bytes at a random place.
            let width = 1 << rng.below(4);
            let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
            if len >= width {
                let i = rng.below(len - width + 1);
                data[i..i + width].copy_from_slice(&v[..width]);
            }
        }
        3 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(i..i, bytes);
        }
        4 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            data.drain(i..i + n);
        }
        5 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            let copy = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, copy);
        }
        6 if len > 0 => data.truncate(rng.below(len)),
        7 if !other.is_empty() => {
            let i = rng.below(other.len());
            let n = 1 + rng.below((other.len() - i).min(512));
            let at = rng.below(len + 1);
            let end = (at + n).min(len);
            data.splice(at..end, other[i..i + n].iter().copied());
        }
        8 => {
            // Text: replace a run of digits (or insert) with a troublesome token.
            let tok = TEXT_TOKENS[rng.below(TEXT_TOKENS.len())].as_bytes();
            let digits: Vec<usize> = (0..len).filter(|&i| data[i].is_ascii_digit()).collect();
            if digits.is_empty() {
                let at = rng.below(len + 1);
                data.splice(at..at, tok.iter().copied());
            } else {
                let start = digits[rng.below(digits.len())];
                let end = (start..len)
                    .find(|&i| !data[i].is_ascii_digit())
                    .unwrap_or(len);
                data.splice(start..end, tok.iter().copied());
            }
        }
        _ => {
            // Repeat a short slice many times (long strings, long arrays).
            if len > 0 {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                let slice = data[i..i + n].to_vec();
                let reps = 1 + rng.below(2000);
                let at = rng.below(len + 1);
                data.splice(at..at, slice.iter().copied().cycle().take(n * reps));
            }
        }
    }
}
