//! The sampling rule: how one row of f32 logits and a [`Draw`] give a token, bit for bit the
//! same on the CPU ([`draw`]) and on the GPU (cuda/sampling.cu, whose shared arithmetic is
//! cuda/sampling_rule.cuh: every function here that the device repeats names its twin there).
//!
//! # The rule
//!
//! **Order.** Values are compared through [`order_key`], an order-preserving map of an f32 to a
//! u32: IEEE total order with every NaN mapped to 0 (below -inf) and -0 < +0. "Largest" and
//! "equal" below always mean by key; among equal keys the lowest token index wins.
//!
//! **Greedy.** `temperature` not > 0 (0, negative or NaN): the token with the largest logit.
//!
//! **Scaled logits.** z_i = logit_i / temperature (one correctly rounded f32 division) and
//! m = the largest z. When m is not finite (a row of NaN and -inf, or a z that overflowed to
//! +inf) the draw is greedy on z: the token with the largest z.
//!
//! **Masses.** w_i = floor(exp(z_i - m) · 2^32) as an integer (u64), with exp the portable
//! [`exp_portable`] on d = z_i - m (one f32 subtraction), and w_i = 0 when d < -23 (exp(-23)·2^32
//! < 1 anyway) or z_i is NaN. The largest token has w = 2^32 exactly, a row's total is at most
//! vocab · 2^32 (below 2^49 for DeepSeek's 129,280), and every sum below is an integer sum, so
//! no summation order matters.
//!
//! **Top-k.** K = top_k; t_k = the K-th largest key counted with multiplicity, or 1 when top_k is
//! 0 or no K-th non-NaN key exists. The top-k set is every token with key >= t_k: ties at the
//! boundary are all kept (the set may exceed K), and NaN (key 0) is never kept.
//!
//! **Top-p.** When top_p < 1 (NaN counts as 1): W = the mass of the top-k set, the target
//! T = max(1, ceil(top_p · W)) with W converted to f64 and the product and ceil in f64 (each
//! correctly rounded on both sides; a negative product counts as 0), and t_p = the largest key t
//! such that the mass of the tokens with key >= t (within the top-k set) reaches T. The kept set
//! is every token with key >= t_p (ties at the boundary kept). Otherwise the kept set is the
//! top-k set. The largest token is always kept.
//!
//! **Noise.** Per token i, 64 bits [`noise_bits`]`(seed, counter, i)` (SplitMix64: a row state
//! from (seed, counter), then the stream's (i+1)-th output), and from their top 32 bits h a
//! Gumbel variate [`gumbel`]: u = 1 - x with x = f32((2h+1)·2^-33) when h < 2^31, otherwise
//! u = y = f32((2·(2^32-1-h)+1)·2^-33), so u is never 0 or 1 and both tails keep 32 bits;
//! E = -ln(u) (ln(1 - x) through [`ln1m_portable`], ln(y) through [`ln_portable`]) and
//! g = -ln(E). Every g lies in (-3.2, 23).
//!
//! **Draw.** The kept token with the largest s_i = z_i + g_i (one f32 addition), lowest index
//! among equals. A token whose z_i + 23 (f32) is below a score already found cannot win (g < 23
//! and rounding is monotone), so either twin may skip it without changing the draw.
//!
//! The selection is Gumbel-max over the kept set: the token is distributed as softmax(z)
//! restricted to the kept set and renormalized, up to f32 rounding of z + g and the 2^32
//! resolution of the noise. A draft token for position p is accepted by speculative decoding
//! iff the target's draw with counter = p equals it, so sampled output is the same with and
//! without speculation.
//!
//! # Portable arithmetic
//!
//! [`exp_portable`] and [`ln_portable`] use only correctly rounded IEEE f32 operations (add,
//! sub, mul, div, fused multiply-add via [`f32::mul_add`], exact bit manipulation), with their
//! constants given as bit patterns, so the device's `__fadd_rn`/`__fmul_rn`/`__fdiv_rn`/
//! `__fmaf_rn` twins give the same bits. Rust never contracts `a * b + c`; nvcc is kept from it
//! by the `_rn` intrinsics.

/// How one logits row draws its token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// Softmax temperature; not > 0 (0 in practice) is greedy.
    pub temperature: f32,
    /// Keep the `top_k` largest (ties at the boundary included); 0 keeps all.
    pub top_k: u32,
    /// Keep the smallest head of the top-k set holding this much of its mass; 1.0 keeps all.
    pub top_p: f32,
    pub seed: u64,
    /// The absolute sequence position the drawn token will take.
    pub counter: u64,
}

/// The token `d` draws from `logits` (see the module docs for the rule). An empty row draws 0.
pub fn draw(logits: &[f32], d: &Draw) -> u32 {
    draw_impl(logits, d, None).unwrap_or(0)
}

/// The same draw restricted to tokens `allowed` accepts (constrained answers): Gumbel-max over
/// kept ∩ allowed; when the kept set holds no allowed token, the allowed token with the largest
/// logit (lowest index among equals); None when nothing is allowed.
pub fn draw_allowed(logits: &[f32], d: &Draw, allowed: impl Fn(u32) -> bool) -> Option<u32> {
    draw_impl(logits, d, Some(&allowed))
}

/// Order-preserving u32 key of an f32: IEEE total order (-0 < +0), every NaN mapped to 0.
/// Twin: `r1_sample::order_key` (cuda/sampling_rule.cuh).
#[inline]
pub fn order_key(x: f32) -> u32 {
    if x.is_nan() {
        return 0;
    }
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// d = z - m below this has no mass (exp(-23) · 2^32 < 1).
const MASS_CUTOFF: f32 = -23.0;
/// Every Gumbel variate is below this (checked at the extremes by the tests).
const G_MAX: f32 = 23.0;

/// The kept set's candidates and the largest z; everything a draw needs besides the noise.
struct Scaled {
    z: Vec<f32>,
    keys: Vec<u32>,
    /// The largest z (finite).
    m: f32,
}

fn draw_impl(logits: &[f32], d: &Draw, allowed: Option<&dyn Fn(u32) -> bool>) -> Option<u32> {
    let is_allowed = |i: u32| allowed.is_none_or(|a| a(i));
    // The allowed token with the largest logit: greedy, and the fallback of a constrained draw.
    let best_logit = || best_by_key(logits.iter().copied(), is_allowed);
    if logits.is_empty() {
        return None;
    }
    if d.temperature.is_nan() || d.temperature <= 0.0 {
        return best_logit();
    }
    let z: Vec<f32> = logits.iter().map(|&l| l / d.temperature).collect();
    let keys: Vec<u32> = z.iter().map(|&v| order_key(v)).collect();
    let top = argmax_key(&keys);
    let m = z[top as usize];
    if !m.is_finite() {
        return if is_allowed(top) {
            Some(top)
        } else {
            best_logit()
        };
    }
    let s = Scaled { z, keys, m };
    let t = kept_threshold(&s, d);
    let base = row_state(d.seed, d.counter);
    // (score, its key, token) of the best kept allowed token so far; the largest token first,
    // so that the skip below starts early.
    let mut best: Option<(f32, u32, u32)> = None;
    let order = std::iter::once(top).chain((0..s.z.len() as u32).filter(|&i| i != top));
    for i in order {
        let (k, zi) = (s.keys[i as usize], s.z[i as usize]);
        if k < t || !is_allowed(i) {
            continue;
        }
        // g < G_MAX: this token cannot reach a score already found (module docs).
        if best.is_some_and(|(b, _, _)| zi + G_MAX < b) {
            continue;
        }
        let score = zi + gumbel(stream_bits(base, i));
        let sk = order_key(score);
        if best.is_none_or(|(_, bk, bi)| sk > bk || (sk == bk && i < bi)) {
            best = Some((score, sk, i));
        }
    }
    match best {
        Some((_, _, i)) => Some(i),
        None => best_logit(),
    }
}

/// The lowest index of the largest key.
fn argmax_key(keys: &[u32]) -> u32 {
    let mut best = 0;
    for (i, &k) in keys.iter().enumerate() {
        if k > keys[best] {
            best = i;
        }
    }
    best as u32
}

/// The lowest index of the largest value (by key) among the tokens `ok` accepts.
fn best_by_key(values: impl Iterator<Item = f32>, ok: impl Fn(u32) -> bool) -> Option<u32> {
    let mut best: Option<(u32, u32)> = None;
    for (i, v) in values.enumerate() {
        let i = i as u32;
        let k = order_key(v);
        if ok(i) && best.is_none_or(|(b, _)| k > b) {
            best = Some((k, i));
        }
    }
    best.map(|(_, i)| i)
}

/// The integer mass of a token with scaled logit `z` in a row whose largest is `m` (finite).
/// Twin: `r1_sample::mass`.
#[inline]
fn mass(z: f32, m: f32) -> u64 {
    let d = z - m;
    if d.is_nan() || d < MASS_CUTOFF {
        return 0;
    }
    (exp_portable(d) * 4_294_967_296.0) as u64
}

/// The smallest key kept (>= 1: NaN is never kept).
fn kept_threshold(s: &Scaled, d: &Draw) -> u32 {
    let n = s.keys.len();
    let k = d.top_k as usize;
    let t_k = if k == 0 || k > n {
        1
    } else {
        let mut sorted = s.keys.clone();
        let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        (*kth).max(1)
    };
    if d.top_p.is_nan() || d.top_p >= 1.0 {
        return t_k;
    }
    // Only tokens with mass can hold the boundary: the crossing key has mass of its own.
    let mut heavy: Vec<(u32, u64)> = s
        .keys
        .iter()
        .zip(&s.z)
        .filter(|(&k, _)| k >= t_k)
        .map(|(&k, &z)| (k, mass(z, s.m)))
        .filter(|&(_, w)| w > 0)
        .collect();
    let total: u64 = heavy.iter().map(|&(_, w)| w).sum();
    let target = ((f64::from(d.top_p) * total as f64).ceil() as u64).max(1);
    heavy.sort_unstable_by_key(|&(k, _)| std::cmp::Reverse(k));
    let mut acc = 0u64;
    for (j, &(k, w)) in heavy.iter().enumerate() {
        acc += w;
        let last_of_key = heavy.get(j + 1).is_none_or(|&(next, _)| next != k);
        if last_of_key && acc >= target {
            return k;
        }
    }
    // target <= total: the loop returns at the latest on the last key.
    t_k
}

// ------------------------------------------------------------------------------------------
// Noise
// ------------------------------------------------------------------------------------------

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function. Twin: `r1_sample::mix64`.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64, the generator the noise is built from (a row's noise is its stream at token
/// offsets, [`noise_bits`]); also the crate's seeded generator for synthetic data.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 bits of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }

    /// The `n`-th output (from 1) of the sequence seeded with `seed`, without the ones before.
    pub fn nth(seed: u64, n: u64) -> u64 {
        mix64(seed.wrapping_add(n.wrapping_mul(GOLDEN)))
    }
}

/// The row state of (seed, counter): mix64(mix64(seed + γ) ^ counter), where mix64(seed + γ)
/// is SplitMix64's first output for `seed`. Twin: `r1_sample::row_state`.
#[inline]
fn row_state(seed: u64, counter: u64) -> u64 {
    mix64(mix64(seed.wrapping_add(GOLDEN)) ^ counter)
}

/// Token `i`'s bits from a row state: SplitMix64's (i+1)-th output from that state.
/// Twin: `r1_sample::stream_bits`.
#[inline]
fn stream_bits(state: u64, i: u32) -> u64 {
    SplitMix64::nth(state, u64::from(i) + 1)
}

/// The 64 noise bits of token `i` for (seed, counter).
pub fn noise_bits(seed: u64, counter: u64, i: u32) -> u64 {
    stream_bits(row_state(seed, counter), i)
}

/// The Gumbel variate of 64 noise bits (their top 32 are used; module docs).
/// Twin: `r1_sample::gumbel`.
#[inline]
pub fn gumbel(bits: u64) -> f32 {
    let h = (bits >> 32) as u32;
    // 2^-33, exact.
    let scale = f32::from_bits(0x2F00_0000);
    let e = if h < 0x8000_0000 {
        let x = (2 * h + 1) as f32 * scale;
        -ln1m_portable(x)
    } else {
        let y = (2 * !h + 1) as f32 * scale;
        -ln_portable(y)
    };
    -ln_portable(e)
}

// ------------------------------------------------------------------------------------------
// Portable exp and ln
// ------------------------------------------------------------------------------------------

// Constants as bit patterns, repeated in cuda/sampling_rule.cuh.
const LOG2E: u32 = 0x3FB8_AA3B; // 1.44269502
const ROUND_MAGIC: u32 = 0x4B40_0000; // 1.5 * 2^23: adding it rounds to an integer
const LN2_HI: u32 = 0x3F31_8000; // 0.693359375 (few bits: e * LN2_HI is exact)
const LN2_LO: u32 = 0xB95E_8083; // ln 2 - LN2_HI = -2.12194440e-4
const SQRT2: u32 = 0x3FB5_04F3; // sqrt(2)
/// exp(r) on |r| <= ln2/2: Taylor coefficients 1/7! .. 1/2!, then 1, 1.
const EXP_POLY: [u32; 6] = [
    0x3950_0D01, // 1/5040
    0x3AB6_0B61, // 1/720
    0x3C08_8889, // 1/120
    0x3D2A_AAAB, // 1/24
    0x3E2A_AAAB, // 1/6
    0x3F00_0000, // 1/2
];
/// ln(1+f) = 2s + s·R(s²), s = f/(2+f): R's coefficients 2/11 .. 2/3 (times s² once more).
const LN_POLY: [u32; 5] = [
    0x3E3A_2E8C, // 2/11
    0x3E63_8E39, // 2/9
    0x3E92_4925, // 2/7
    0x3ECC_CCCD, // 2/5
    0x3F2A_AAAB, // 2/3
];

#[inline]
fn c(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// e^d for d in [-23, 0] (the masses' domain; accurate to 2 ulp on [-87, 88]), from correctly
/// rounded f32 operations only. Twin: `r1_sample::exp_portable`.
#[inline]
pub fn exp_portable(d: f32) -> f32 {
    let magic = c(ROUND_MAGIC);
    // k = round-to-nearest-even(d · log2 e): the fma rounds once, at the integer.
    let k = d.mul_add(c(LOG2E), magic) - magic;
    let r = k.mul_add(-c(LN2_HI), d);
    let r = k.mul_add(-c(LN2_LO), r);
    let mut p = c(EXP_POLY[0]);
    for &coef in &EXP_POLY[1..] {
        p = p.mul_add(r, c(coef));
    }
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // 2^k as bits; k in [-126, 127] for the documented domain.
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    p * scale
}

/// 2·atanh(s) = ln((1+s)/(1-s)) for |s| <= 1/7, as 2s + s·R(s²).
#[inline]
fn ln_series(s: f32) -> f32 {
    let z = s * s;
    let mut r = c(LN_POLY[0]);
    for &coef in &LN_POLY[1..] {
        r = r.mul_add(z, c(coef));
    }
    r *= z;
    s.mul_add(r, s + s)
}

/// ln(y) for a positive normal finite y, from correctly rounded f32 operations only.
/// Twin: `r1_sample::ln_portable`.
#[inline]
pub fn ln_portable(y: f32) -> f32 {
    let bits = y.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 127;
    let mut mbits = (bits & 0x007F_FFFF) | 0x3F80_0000;
    // m in [sqrt(1/2), sqrt(2)): halve the upper part of [1, 2).
    if mbits > SQRT2 {
        mbits -= 0x0080_0000;
        e += 1;
    }
    let f = f32::from_bits(mbits) - 1.0; // exact
    let s = f / (2.0 + f);
    let ef = e as f32;
    ef.mul_add(c(LN2_HI), ef.mul_add(c(LN2_LO), ln_series(s)))
}

/// ln(1 - x) for x in (0, 1/2], keeping the precision of a small x (ln(1 - x) ≈ -x).
/// Twin: `r1_sample::ln1m_portable`.
#[inline]
pub fn ln1m_portable(x: f32) -> f32 {
    if x < 0.25 {
        ln_series(-x / (2.0 - x))
    } else {
        ln_portable(1.0 - x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(temperature: f32, top_k: u32, top_p: f32, seed: u64, counter: u64) -> Draw {
        Draw {
            temperature,
            top_k,
            top_p,
            seed,
            counter,
        }
    }

    /// Test data from [`SplitMix64`].
    struct Gen(SplitMix64);
    impl Gen {
        fn new(seed: u64) -> Self {
            Gen(SplitMix64::new(seed))
        }
        fn next(&mut self) -> u64 {
            self.0.next_u64()
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f32 {
            let (a, b) = (self.unit().max(1e-300), self.unit());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        }
    }

    fn ulps(a: f32, b: f32) -> u32 {
        order_key(a).abs_diff(order_key(b))
    }

    // ---------------------------------------------------------------- known answers

    #[test]
    fn constants_are_the_values_they_name() {
        assert_eq!(c(LOG2E), std::f32::consts::LOG2_E);
        assert_eq!(c(ROUND_MAGIC), 12_582_912.0);
        assert_eq!(c(LN2_HI), 0.693_359_4);
        assert_eq!(
            c(LN2_LO),
            (std::f64::consts::LN_2 - f64::from(c(LN2_HI))) as f32
        );
        assert_eq!(c(SQRT2), std::f32::consts::SQRT_2);
        let fact = [5040.0, 720.0, 120.0, 24.0, 6.0, 2.0];
        for (bits, n) in EXP_POLY.iter().zip(fact) {
            assert_eq!(c(*bits), (1.0 / n) as f32);
        }
        for (bits, n) in LN_POLY.iter().zip([11.0, 9.0, 7.0, 5.0, 3.0]) {
            assert_eq!(c(*bits), (2.0 / n) as f32);
        }
    }

    /// SplitMix64's published first output for seed 0 anchors the hash; the rest are this
    /// rule's own known answers, repeated in tests/gpu_sampling.rs against the device.
    /// SplitMix64's published sequence for seed 0.
    #[test]
    fn generator_is_splitmix64() {
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut rng = SplitMix64::new(77);
        for n in 1..100 {
            assert_eq!(rng.next_u64(), SplitMix64::nth(77, n));
        }
    }

    #[test]
    fn noise_known_answers() {
        assert_eq!(mix64(GOLDEN), 0xE220_A839_7B1D_CDAF);
        assert_eq!(row_state(0, 0), mix64(0xE220_A839_7B1D_CDAF));
        assert_eq!(
            noise_bits(0, 0, 0),
            mix64(row_state(0, 0).wrapping_add(GOLDEN))
        );
        let kat: Vec<u64> = [(0, 0, 0), (1, 2, 3), (u64::MAX, 7, 129_279)]
            .iter()
            .map(|&(s, c, i)| noise_bits(s, c, i))
            .collect();
        assert_eq!(
            kat,
            [
                0x568A_9B0B_1A2C_05EC,
                0xEB3A_A0CE_549F_EC8C,
                0x414C_5320_42AB_7915
            ],
            "{kat:#018x?}"
        );
    }

    #[test]
    fn portable_known_answers() {
        assert_eq!(exp_portable(0.0), 1.0);
        assert_eq!(ln_portable(1.0), 0.0);
        let kat = [
            exp_portable(-1.0).to_bits(),
            exp_portable(-22.5).to_bits(),
            ln_portable(0.5).to_bits(),
            ln_portable(3.0e-10).to_bits(),
            ln1m_portable(1.0e-9).to_bits(),
            gumbel(0).to_bits(),
            gumbel(u64::MAX).to_bits(),
        ];
        assert_eq!(
            kat,
            [
                0x3EBC_5AB2, // e^-1
                0x2F3A_06B1,
                0xBF31_7218, // ln 0.5
                0xC1AF_6AFC,
                0xB089_705F, // ≈ -1e-9
                0x41B6_FDA9, // 22.87: the largest Gumbel variate
                0xC048_51D5, // -3.13: the smallest
            ],
            "{kat:#010x?}"
        );
    }

    // ---------------------------------------------------------------- accuracy

    /// Max ulp error against f64 over about a million f32 spread evenly (by bit pattern, an odd
    /// step so every mantissa bit varies) over [lo, hi].
    fn max_ulps(lo: f32, hi: f32, f: fn(f32) -> f32, reference: fn(f64) -> f64) -> (u32, f32) {
        let (a, b) = (order_key(lo), order_key(hi));
        let mut worst = (0, lo);
        let step = ((b - a) / 1_000_000) | 1;
        let mut k = a;
        while k <= b {
            let x = if k & 0x8000_0000 != 0 {
                f32::from_bits(k & 0x7FFF_FFFF)
            } else {
                f32::from_bits(!k)
            };
            let e = ulps(f(x), reference(f64::from(x)) as f32);
            if e > worst.0 {
                worst = (e, x);
            }
            k += step;
        }
        worst
    }

    #[test]
    fn exp_is_within_2_ulp() {
        let (e, x) = max_ulps(-23.0, 0.0, exp_portable, f64::exp);
        assert!(e <= 2, "exp_portable({x}) is {e} ulp off");
        let (e, x) = max_ulps(-87.0, 88.0, exp_portable, f64::exp);
        assert!(e <= 2, "exp_portable({x}) is {e} ulp off");
    }

    #[test]
    fn ln_is_within_2_ulp_and_ln1m_within_4() {
        let (e, x) = max_ulps(1.0e-30, 1.0e30, ln_portable, f64::ln);
        assert!(e <= 2, "ln_portable({x}) is {e} ulp off");
        let (e, x) = max_ulps(
            1.0e-12,
            0.5,
            ln1m_portable,
            |x| (-x).ln_1p(), // ln(1 - x)
        );
        // 1 - x is rounded for x in [1/4, 1/2).
        assert!(e <= 4, "ln1m_portable({x}) is {e} ulp off");
    }

    #[test]
    fn gumbel_stays_in_its_bounds() {
        for h in [0u32, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF] {
            let g = gumbel(u64::from(h) << 32);
            assert!(g > -3.2 && g < G_MAX, "h = {h:#x}: g = {g}");
        }
        // Exact math: g = -ln(-ln(u)) at u = 1 - 2^-33 and u = 2^-33.
        let top = -(-(-(2f64.powi(-33))).ln_1p()).ln();
        assert!((f64::from(gumbel(0)) - top).abs() < 1e-5, "{top}");
        let bottom = -(33.0 * std::f64::consts::LN_2).ln();
        assert!((f64::from(gumbel(u64::MAX)) - bottom).abs() < 1e-5);
    }

    // ---------------------------------------------------------------- the oracle

    /// The old sampler's semantics, written plainly in f64: softmax(z) restricted by top-k
    /// (ties at the boundary kept) then top-p (the head of the top-k set, in key order, whose
    /// mass reaches top_p; ties kept), renormalized. Returns (token, probability).
    fn oracle(logits: &[f32], d: &Draw) -> Vec<(u32, f64)> {
        let z: Vec<f32> = logits.iter().map(|&l| l / d.temperature).collect();
        let mut idx: Vec<u32> = (0..z.len() as u32)
            .filter(|&i| !z[i as usize].is_nan())
            .collect();
        idx.sort_by(|&a, &b| {
            order_key(z[b as usize])
                .cmp(&order_key(z[a as usize]))
                .then(a.cmp(&b))
        });
        let key = |i: u32| order_key(z[i as usize]);
        let m = f64::from(z[idx[0] as usize]);
        let p = |i: u32| (f64::from(z[i as usize]) - m).exp();
        if d.top_k > 0 && (d.top_k as usize) < idx.len() {
            let kth = key(idx[d.top_k as usize - 1]);
            idx.retain(|&i| key(i) >= kth);
        }
        if d.top_p < 1.0 {
            let total: f64 = idx.iter().map(|&i| p(i)).sum();
            let mut acc = 0.0;
            let mut end = idx.len();
            for j in 0..idx.len() {
                acc += p(idx[j]);
                let last = j + 1 == idx.len() || key(idx[j + 1]) != key(idx[j]);
                if last && acc >= f64::from(d.top_p) * total {
                    end = j + 1;
                    break;
                }
            }
            idx.truncate(end);
        }
        let total: f64 = idx.iter().map(|&i| p(i)).sum();
        idx.iter().map(|&i| (i, p(i) / total)).collect()
    }

    /// The kept set the rule computes (tokens with key >= the threshold).
    fn kept(logits: &[f32], d: &Draw) -> Vec<u32> {
        let z: Vec<f32> = logits.iter().map(|&l| l / d.temperature).collect();
        let keys: Vec<u32> = z.iter().map(|&v| order_key(v)).collect();
        let m = z[argmax_key(&keys) as usize];
        let t = kept_threshold(&Scaled { z, keys, m }, d);
        (0..logits.len() as u32)
            .filter(|&i| order_key(logits[i as usize] / d.temperature) >= t)
            .collect()
    }

    fn logits_row(g: &mut Gen, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| g.normal() * scale).collect()
    }

    #[test]
    fn greedy_is_argmax_lowest_index_and_nan_never_wins() {
        let greedy = d(0.0, 0, 1.0, 1, 2);
        assert_eq!(draw(&[0.0, 3.0, 3.0, 1.0], &greedy), 1);
        assert_eq!(draw(&[f32::NAN, -1.0, f32::NAN], &greedy), 1);
        assert_eq!(draw(&[f32::NAN, f32::NAN], &greedy), 0);
        assert_eq!(draw(&[-0.0, 0.0], &greedy), 1, "+0 above -0");
        assert_eq!(draw(&[], &greedy), 0);
        let mut g = Gen::new(5);
        for _ in 0..20 {
            let row = logits_row(&mut g, 1000, 3.0);
            let want = (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                .unwrap() as u32;
            assert_eq!(draw(&row, &greedy), want);
            // A negative or NaN temperature is greedy too.
            assert_eq!(draw(&row, &d(-1.0, 0, 1.0, 0, 0)), want);
            assert_eq!(draw(&row, &d(f32::NAN, 0, 1.0, 0, 0)), want);
        }
    }

    #[test]
    fn degenerate_rows_are_greedy_on_z() {
        let t = d(1.0, 0, 1.0, 3, 4);
        assert_eq!(
            draw(&[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY], &t),
            0
        );
        assert_eq!(draw(&[1.0, f32::INFINITY, f32::INFINITY], &t), 1);
        // 1e30 / 1e-10 overflows to +inf: the two become equal, the lower index wins.
        assert_eq!(draw(&[0.0, 1e30, 2e30], &d(1e-10, 0, 1.0, 0, 0)), 1);
        // NaN and -inf logits are never drawn from a finite row.
        for counter in 0..200 {
            let row = [f32::NAN, 0.0, f32::NEG_INFINITY, 0.5, f32::NAN];
            let tok = draw(&row, &d(1.0, 0, 1.0, 9, counter));
            assert!(tok == 1 || tok == 3, "{tok}");
        }
    }

    #[test]
    fn kept_sets_match_the_oracle() {
        let mut g = Gen::new(11);
        let mut cases = 0;
        for &n in &[1usize, 2, 7, 100, 5000] {
            for &scale in &[0.1f32, 2.0, 8.0] {
                for &(temp, k, p) in &[
                    (1.0f32, 0u32, 1.0f32),
                    (0.6, 1, 1.0),
                    (1.0, 50, 1.0),
                    (1.5, 0, 0.95),
                    (0.6, 0, 0.5),
                    (1.0, 50, 0.9),
                    (1.0, 3, 0.3),
                    (0.7, 0, 0.999),
                ] {
                    let mut row = logits_row(&mut g, n, scale);
                    // Ties: copy some values, round others to a coarse grid.
                    for i in (0..n).step_by(7) {
                        row[i] = row[i / 2];
                    }
                    if n > 10 {
                        row[3] = (row[3] * 4.0).round() / 4.0;
                    }
                    let dr = d(temp, k, p, 0, 0);
                    let mut want: Vec<u32> = oracle(&row, &dr).iter().map(|x| x.0).collect();
                    want.sort_unstable();
                    assert_eq!(kept(&row, &dr), want, "n {n} scale {scale} {dr:?}");
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 120);
        // Ties at the top-k boundary are all kept.
        let row = [1.0, 3.0, 2.0, 3.0, 2.0];
        assert_eq!(kept(&row, &d(1.0, 1, 1.0, 0, 0)), [1, 3]);
        assert_eq!(kept(&row, &d(1.0, 3, 1.0, 0, 0)), [1, 2, 3, 4]);
        // A top_k past the vocabulary, NaN excluded.
        assert_eq!(kept(&[1.0, f32::NAN, 0.0], &d(1.0, 9, 1.0, 0, 0)), [0, 2]);
        assert_eq!(kept(&[1.0, f32::NAN, 0.0], &d(1.0, 3, 1.0, 0, 0)), [0, 2]);
        // top_p 0 keeps the largest only.
        assert_eq!(kept(&row, &d(1.0, 0, 0.0, 0, 0)), [1, 3]);
    }

    /// Empirical frequencies over many counters match the oracle: each token's count within
    /// 5 standard deviations of n·q (q from the oracle, plus an allowance for the rule's f32
    /// rounding), and the total chi-square below its 1e-6 quantile bound.
    #[test]
    fn draws_follow_the_oracle_distribution() {
        let n = 60_000u64;
        let rows: [(&[f32], Draw); 4] = [
            (&[0.0, 1.0, 2.0, -1.0, 0.5], d(1.0, 0, 1.0, 7, 0)),
            (&[0.0, 1.0, 2.0, -1.0, 0.5], d(0.6, 3, 1.0, 8, 0)),
            (&[3.0, 2.5, 2.5, 0.0, 1.0, -2.0, 2.9], d(1.5, 0, 0.8, 9, 0)),
            (
                &[-5.0, -6.0, -4.0, -7.0, -4.5, -20.0],
                d(1.0, 5, 0.95, 10, 0),
            ),
        ];
        for (row, base) in rows {
            let dist = oracle(row, &base);
            let mut counts = vec![0u64; row.len()];
            for counter in 0..n {
                counts[draw(row, &Draw { counter, ..base }) as usize] += 1;
            }
            let mut chi2 = 0.0;
            for (i, &c) in counts.iter().enumerate() {
                let q = dist.iter().find(|x| x.0 == i as u32).map_or(0.0, |x| x.1);
                let mean = n as f64 * q;
                let sd = (mean * (1.0 - q)).sqrt();
                assert!(
                    (c as f64 - mean).abs() <= 5.0 * sd + 1e-4 * n as f64,
                    "{base:?} token {i}: {c} draws, expected {mean:.0} ± {sd:.0}"
                );
                if q > 0.0 {
                    chi2 += (c as f64 - mean).powi(2) / mean;
                }
            }
            // Chi-square with <= 6 degrees of freedom exceeds 40 with probability < 1e-6.
            assert!(chi2 < 40.0, "{base:?}: chi-square {chi2}");
        }
    }

    #[test]
    fn draw_allowed_restricts_and_falls_back() {
        let row = [0.0, 5.0, 4.0, 1.0, 4.5];
        let t = d(1.0, 0, 1.0, 1, 0);
        for counter in 0..500 {
            let dr = Draw { counter, ..t };
            let tok = draw_allowed(&row, &dr, |i| i % 2 == 0).unwrap();
            assert!(tok % 2 == 0);
            // Unrestricted, it is draw().
            assert_eq!(draw_allowed(&row, &dr, |_| true), Some(draw(&row, &dr)));
        }
        // Kept set {1} holds no allowed token: the allowed token with the largest logit.
        let k1 = d(1.0, 1, 1.0, 1, 0);
        assert_eq!(draw_allowed(&row, &k1, |i| i != 1), Some(4));
        assert_eq!(draw_allowed(&row, &k1, |_| false), None);
        let greedy = d(0.0, 0, 1.0, 0, 0);
        assert_eq!(draw_allowed(&row, &greedy, |i| i < 3), Some(1));
        assert_eq!(draw_allowed(&row, &greedy, |i| i == 0 || i == 3), Some(3));
        assert_eq!(draw_allowed(&[], &greedy, |_| true), None);
    }

    #[test]
    fn draws_are_deterministic_and_depend_on_seed_and_counter() {
        let mut g = Gen::new(3);
        let row = logits_row(&mut g, 129_280, 2.0);
        let base = d(1.0, 0, 1.0, 42, 17);
        let first = draw(&row, &base);
        assert_eq!(draw(&row, &base), first);
        let distinct: std::collections::BTreeSet<u32> = (0..32)
            .map(|s| draw(&row, &Draw { seed: s, ..base }))
            .chain((0..32).map(|c| draw(&row, &Draw { counter: c, ..base })))
            .collect();
        assert!(distinct.len() > 32, "{distinct:?}");
    }
}
