//! float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, NaN = S.1111.111,
//! largest finite 448.

const MAX_FINITE: f32 = 448.0;
const MAX_FINITE_CODE: u8 = 0x7E;
const NAN_CODE: u8 = 0x7F;

static DECODE: [f32; 256] = {
    let mut table = [0f32; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode_slow(code as u8);
        code += 1;
    }
    table
};

const fn decode_slow(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((code >> 3) & 0x0F) as i32;
    let mant = (code & 0x07) as f32;
    if exp == 0x0F && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        // Subnormal: m/8 * 2^-6.
        mant / 8.0 / 64.0
    } else {
        let mut scale = 1.0f32;
        let mut e = exp - 7;
        while e > 0 {
            scale *= 2.0;
            e -= 1;
        }
        while e < 0 {
            scale /= 2.0;
            e += 1;
        }
        (1.0 + mant / 8.0) * scale
    };
    sign * magnitude
}

/// The value of an e4m3 code.
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    DECODE[code as usize]
}

/// Nearest e4m3 code (ties to even), saturating to +-448 like `cvt.rn.satfinite.e4m3x2.f32`;
/// NaN maps to NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return NAN_CODE;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= MAX_FINITE {
        return sign | MAX_FINITE_CODE;
    }
    // Below 2^-6 the spacing is uniform (2^-9): subnormals, and 2^-6 itself when it rounds up.
    let min_normal = 1.0 / 64.0;
    if a < min_normal {
        let steps = (a * 512.0).round_ties_even() as u8; // exact scaling by a power of two
        return sign | steps;
    }
    let exponent = ((a.to_bits() >> 23) & 0xFF) as i32 - 127; // -6..=8
    let frac = a / f32::from_bits(((exponent + 127) as u32) << 23) - 1.0; // [0, 1), exact
    let mut mantissa = (frac * 8.0).round_ties_even() as i32;
    let mut biased = exponent + 7;
    if mantissa == 8 {
        mantissa = 0;
        biased += 1;
    }
    let code = ((biased << 3) | mantissa) as u8;
    sign | code.min(MAX_FINITE_CODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_code_round_trips() {
        for code in 0..=255u8 {
            let v = e4m3_to_f32(code);
            if code & 0x7F == NAN_CODE {
                assert!(v.is_nan());
                assert_eq!(f32_to_e4m3(v) & 0x7F, NAN_CODE);
            } else if code == 0x80 {
                assert_eq!(f32_to_e4m3(v), 0x80, "-0 keeps its sign");
            } else {
                assert_eq!(f32_to_e4m3(v), code, "code {code:#04x} = {v}");
            }
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(f32_to_e4m3(1e9), 0x7E);
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_e4m3(460.0), 0x7E);
        // Midpoints round to the even mantissa.
        assert_eq!(f32_to_e4m3(1.0625), 0x38); // between 1.0 (even) and 1.125
        assert_eq!(f32_to_e4m3(1.1875), 0x3A); // between 1.125 and 1.25 (even)
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00); // half the smallest subnormal -> 0
        assert_eq!(f32_to_e4m3(3.0 * 2f32.powi(-10)), 0x02); // 1.5 steps -> 2 (even)
    }

    fn finite_codes() -> impl Strategy<Value = u8> {
        (0u8..=255).prop_filter("finite", |c| c & 0x7F != NAN_CODE)
    }

    proptest! {
        /// The result is the nearest representable value, ties to the even code.
        #[test]
        fn rounds_to_nearest_even(x in -500f32..500f32) {
            let code = f32_to_e4m3(x);
            let got = e4m3_to_f32(code);
            let clamped = x.clamp(-448.0, 448.0);
            for other in (0u8..=255).filter(|c| c & 0x7F != NAN_CODE) {
                let d_other = (e4m3_to_f32(other) - clamped).abs();
                let d_got = (got - clamped).abs();
                prop_assert!(d_got <= d_other, "{x}: got {got}, {} is closer", e4m3_to_f32(other));
                if d_got == d_other && e4m3_to_f32(other) != got {
                    prop_assert_eq!(code & 1, 0, "tie at {} must pick the even code", x);
                }
            }
        }

        #[test]
        fn midpoints_between_neighbours(code in finite_codes()) {
            let lo = e4m3_to_f32(code);
            let next = code.wrapping_add(1);
            prop_assume!(code & 0x80 == 0 && next <= MAX_FINITE_CODE);
            let hi = e4m3_to_f32(next);
            let mid = (lo + hi) / 2.0;
            let expected = if code % 2 == 0 { code } else { next };
            prop_assert_eq!(f32_to_e4m3(mid), expected);
        }
    }
}
