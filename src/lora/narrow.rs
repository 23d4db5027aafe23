//! A pair's factors in the 16-bit float format that holds every one of their values exactly:
//! an adapter stored in f16 or bf16 (llama.cpp's `--outtype f16`, PEFT checkpoints of
//! half-precision runs) keeps its file's bytes for the single-token products. Decode reads
//! each factor once per token, so half the bytes is half the adapter's cost there; the
//! kernels widen the values as they load them, so every product keeps its bits.

use std::sync::OnceLock;

use half::{bf16, f16};

/// `A` and `B` in one 16-bit format.
#[derive(Debug, Clone)]
pub enum Narrow {
    F16 { a: Vec<f16>, b: Vec<f16> },
    Bf16 { a: Vec<bf16>, b: Vec<bf16> },
}

impl Narrow {
    /// `a` and `b` in f16 or else bf16, if one of them holds every value exactly.
    fn exact(a: &[f32], b: &[f32]) -> Option<Narrow> {
        fn all<T>(values: &[f32], from: fn(f32) -> T, to: fn(&T) -> f32) -> Option<Vec<T>> {
            values
                .iter()
                .map(|&v| Some(from(v)).filter(|n| to(n).to_bits() == v.to_bits()))
                .collect()
        }
        let f16s = |v: &[f32]| all(v, f16::from_f32, |h| h.to_f32());
        let bf16s = |v: &[f32]| all(v, bf16::from_f32, |h| h.to_f32());
        if let (Some(a), Some(b)) = (f16s(a), f16s(b)) {
            return Some(Narrow::F16 { a, b });
        }
        Some(Narrow::Bf16 {
            a: bf16s(a)?,
            b: bf16s(b)?,
        })
    }
}

/// A pair's `Narrow` copy, made on first use from its f32 values; whoever changes the values
/// must `forget` it.
#[derive(Debug, Clone, Default)]
pub struct NarrowCopy(OnceLock<Option<Narrow>>);

impl NarrowCopy {
    /// The copy of `a` and `b` (the values this was made from), if a 16-bit format holds them.
    pub fn of(&self, a: &[f32], b: &[f32]) -> Option<&Narrow> {
        self.0.get_or_init(|| Narrow::exact(a, b)).as_ref()
    }

    pub fn forget(&mut self) {
        self.0.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_that_holds_every_value() {
        let f16_only = [0.5, -65504.0, 2f32.powi(-24), -0.0]; // f16's max and least subnormal
        let bf16_only = [2f32.powi(100), -3.0, 0.0]; // beyond f16's range
        let neither = [1.0 + f32::EPSILON];
        let kind = |a: &[f32], b: &[f32]| match Narrow::exact(a, b) {
            Some(Narrow::F16 { a: na, .. }) => {
                assert!(na.iter().zip(a).all(|(n, v)| n.to_f32() == *v));
                "f16"
            }
            Some(Narrow::Bf16 { a: na, .. }) => {
                assert!(na.iter().zip(a).all(|(n, v)| n.to_f32() == *v));
                "bf16"
            }
            None => "none",
        };
        assert_eq!(kind(&f16_only, &[2.0]), "f16");
        assert_eq!(kind(&bf16_only, &[2.0]), "bf16");
        assert_eq!(kind(&f16_only, &bf16_only), "none");
        assert_eq!(kind(&[2.0], &neither), "none");
        // A NaN whose payload the 16-bit formats cannot carry.
        assert_eq!(kind(&[f32::from_bits(0x7fc0_0001)], &[]), "none");
    }

    #[test]
    fn a_forgotten_copy_is_made_again_from_the_new_values() {
        let mut copy = NarrowCopy::default();
        assert!(matches!(copy.of(&[1.0], &[2.0]), Some(Narrow::F16 { .. })));
        copy.forget();
        assert!(copy.of(&[0.1], &[2.0]).is_none());
    }
}
