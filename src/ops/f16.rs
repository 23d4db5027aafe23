//! f16 to f32 in plain integer and float steps. `half` converts with a runtime check and a
//! call per value on CPUs whose f16 instructions it cannot assume at compile time (aarch64
//! without `fp16`): too dear for the scales read once per weight block in the kernels.

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
