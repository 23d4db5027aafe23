//! f16 to f32 in plain integer and float steps, and 8 at a time with NEON. `half` converts
//! with a runtime check and a call per value on CPUs whose f16 instructions it cannot assume
//! at compile time (aarch64 without `fp16`): too dear for the scales read once per weight
//! block in the kernels.

/// The f32 equal to the f16 with `bits` (every value exactly; NaN stays NaN).
#[inline(always)]
pub(crate) fn to_f32(bits: u16) -> f32 {
    let magnitude = u32::from(bits & 0x7fff) << 13;
    let sign = u32::from(bits & 0x8000) << 16;
    // The f16 exponent field placed in the f32's: multiplying by 2^(127 − 15) restores the bias,
    // exactly, for normal and subnormal values alike.
    let finite = f32::from_bits(magnitude) * f32::from_bits(0x7780_0000);
    let value = match magnitude >= 0x7c00 << 13 {
        true => f32::from_bits(magnitude | 0x7f80_0000),
        false => finite,
    };
    f32::from_bits(value.to_bits() | sign)
}

/// The 8 f16 in `v` as f32, values 0–3 then 4–7, exactly: `fcvtl`/`fcvtl2` (baseline
/// aarch64), written as assembly because their intrinsics (`vcvt_f32_f16`) are stable only
/// from Rust 1.94.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) fn widen8(v: core::arch::aarch64::uint16x8_t) -> [core::arch::aarch64::float32x4_t; 2] {
    use core::arch::aarch64::float32x4_t;
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: registers only; NEON is baseline on aarch64.
    unsafe {
        core::arch::asm!(
            "fcvtl {lo:v}.4s, {v:v}.4h",
            "fcvtl2 {hi:v}.4s, {v:v}.8h",
            v = in(vreg) v,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    [lo, hi]
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_f16_widens_as_half_does() {
        for bits in 0..=u16::MAX {
            let (ours, theirs) = (super::to_f32(bits), half::f16::from_bits(bits).to_f32());
            match theirs.is_nan() {
                true => assert!(ours.is_nan(), "{bits:#06x}"),
                false => assert_eq!(ours.to_bits(), theirs.to_bits(), "{bits:#06x}"),
            }
        }
    }
}
