//! `e^x` in f32 without branches or library calls, so that a loop over it vectorizes:
//! Cephes' `expf` (Cody–Waite reduction by ln 2, a degree-7 polynomial on |r| ≤ ln2/2),
//! within 2 ulp of the exact value, with results below f32's smallest normal flushed to 0.

/// Inputs below this give results below `f32::MIN_POSITIVE`: the result is 0.
const UNDERFLOW: f32 = -87.336_55;
/// Inputs above this overflow: the result is infinite.
const OVERFLOW: f32 = 88.722_84;

/// `e^x`; 0 for `x < -87.34` (and for −∞), ∞ for `x > 88.72`, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 · 2²³: adding it rounds to an integer, kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(UNDERFLOW, OVERFLOW);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2ⁿ from the integer in `shifted`'s low bits, n ∈ [-126, 128], applied as 2^(n-k) · 2^k
    // with k = ⌊n/2⌋, so that both factors are normal floats at either end.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let k = n_bits >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) << 23) as u32);
    let y = e_r * pow2(n_bits - k) * pow2(k);
    let y = if x < UNDERFLOW { 0.0 } else { y };
    let y = if x > OVERFLOW { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in representable f32 values.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn within_two_ulp_over_the_normal_range() {
        let mut worst = (0, 0.0);
        let mut x = UNDERFLOW;
        while x <= OVERFLOW {
            let exact = (x as f64).exp() as f32;
            let err = ulps(exp(x), exact);
            if err > worst.0 {
                worst = (err, x);
            }
            x += 1e-4 * (1.0 + x.abs());
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn small_arguments_and_integers_are_exact_enough() {
        for x in [
            0.0f32, -0.0, 1e-8, -1e-8, 1.0, -1.0, 10.0, -10.0, 80.0, -80.0,
        ] {
            let exact = (x as f64).exp() as f32;
            assert!(ulps(exp(x), exact) <= 1, "x = {x}: {} vs {exact}", exp(x));
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn underflows_to_zero_and_overflows_to_infinity() {
        for x in [
            -87.5f32,
            -88.0,
            -100.0,
            -1e4,
            -1e30,
            f32::MIN,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(exp(x), 0.0, "x = {x}");
        }
        for x in [88.8f32, 100.0, 1e30, f32::INFINITY] {
            assert_eq!(exp(x), f32::INFINITY, "x = {x}");
        }
        assert!(exp(f32::NAN).is_nan());
    }
}
