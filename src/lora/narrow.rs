//! A pair's factors in the 16-bit float format that holds every one of their values exactly:
//! an adapter stored in f16 or bf16 (llama.cpp's `--outtype f16`, PEFT checkpoints of
//! half-precision runs) keeps its file's bytes for the single-token products. Decode reads
//! each factor once per token, so half the bytes is half the adapter's cost there; the
//! kernels widen the values as they load them, so every product keeps its bits. An adapter
//! stored in f32 may be rounded to one of them on request (vLLM's `lora_dtype`): inexact,
//! opt-in, and then read at half the bytes.

use std::sync::OnceLock;

use half::{bf16, f16};

use super::adapter::{Half, LoraAdapter};
use crate::error::{Error, Result};
use crate::gguf::TensorType;

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

/// An error naming the first finite value of `values` (of tensor `name`) beyond `dtype`'s
/// range (F32, F16 or BF16): where rounding would make it an infinity.
pub fn check_range(name: &str, values: &[f32], dtype: TensorType) -> Result<()> {
    let holds: fn(f32) -> bool = match dtype {
        TensorType::F32 => |_| true,
        TensorType::F16 => |v| f16::from_f32(v).is_finite(),
        TensorType::BF16 => |v| bf16::from_f32(v).is_finite(),
        other => {
            return Err(Error::invalid(
                "dtype",
                format!("adapter factors are f32, f16 or bf16, not {}", other.name()),
            ))
        }
    };
    match values.iter().find(|v| v.is_finite() && !holds(**v)) {
        Some(v) => Err(Error::invalid(
            "dtype",
            format!(
                "{name} holds {v}, beyond {}'s range: use bf16 or f32",
                dtype.name()
            ),
        )),
        None => Ok(()),
    }
}

impl LoraAdapter {
    /// Rounds every factor to the nearest `dtype` value (ties to even, as the GGUF and
    /// safetensors writers round): F16 or BF16, or F32 (no change). Nothing changes if a
    /// value is beyond the format's range.
    pub fn round_factors(&self, dtype: TensorType) -> Result<()> {
        let round: fn(f32) -> f32 = match dtype {
            TensorType::F16 => |v| f16::from_f32(v).to_f32(),
            TensorType::BF16 => |v| bf16::from_f32(v).to_f32(),
            // F32 holds the values as they are; other types are check_range's error.
            _ => return check_range("", &[], dtype),
        };
        let mut pairs = self.pairs_mut();
        for pair in pairs.iter() {
            for (half, suffix) in [(Half::A, "lora_a"), (Half::B, "lora_b")] {
                let name = format!("{}.{suffix}", pair.name());
                check_range(&name, pair.values(half), dtype)?;
            }
        }
        for pair in pairs.iter_mut() {
            for half in [Half::A, Half::B] {
                pair.values_mut(half)
                    .iter_mut()
                    .for_each(|v| *v = round(*v));
            }
        }
        Ok(())
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
    use crate::lora::{AdapterFormat, LoraPair, ScalingRule};
    use crate::model::Proj;

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

    #[test]
    fn rounded_factors_are_the_nearest_values_and_read_narrow() {
        let a = vec![1.0 / 3.0, -0.1, 1e-8, 2.0, 70000.0, -1e30];
        let b = vec![0.7, 1.0 + f32::EPSILON];
        let pair = LoraPair::of_layer_0(Proj::AttnQ, 2, a.clone(), b.clone());
        let (format, rule) = (AdapterFormat::SafeTensors, ScalingRule::AlphaOverRank);
        let adapter = LoraAdapter::new("llama".into(), format, rule, 2.0, 1.0, vec![pair]);
        assert!(adapter.pairs()[0].narrow().is_none());

        // 70000 and -1e30 are beyond f16: an error naming the first, and nothing rounded.
        let error = adapter
            .round_factors(TensorType::F16)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("blk.0.attn_q.weight.lora_a holds 70000"),
            "{error}"
        );
        assert_eq!(adapter.pairs()[0].lora_a, a);

        adapter.round_factors(TensorType::F32).unwrap();
        assert_eq!(adapter.pairs()[0].lora_a, a);

        adapter.round_factors(TensorType::BF16).unwrap();
        let pairs = adapter.pairs();
        // bf16 keeps f32's exponent and the top 7 bits of its fraction, ties to even.
        let nearest = |v: f32| {
            let bits = v.to_bits();
            let lower = f32::from_bits(bits & 0xffff_0000);
            let upper = f32::from_bits((bits & 0xffff_0000) + 0x1_0000);
            let (dl, du) = ((v - lower).abs(), (upper - v).abs());
            match dl.partial_cmp(&du).unwrap() {
                std::cmp::Ordering::Less => lower,
                std::cmp::Ordering::Greater => upper,
                std::cmp::Ordering::Equal if bits & 0x1_0000 == 0 => lower,
                std::cmp::Ordering::Equal => upper,
            }
        };
        for (rounded, v) in pairs[0]
            .lora_a
            .iter()
            .chain(&pairs[0].lora_b)
            .zip(a.iter().chain(&b))
        {
            assert_eq!(rounded.to_bits(), nearest(*v).to_bits(), "{v}");
        }
        assert!(matches!(pairs[0].narrow(), Some(Narrow::Bf16 { .. })));
    }

    #[test]
    fn only_16_and_32_bit_floats_hold_factors() {
        assert!(check_range("t", &[1.0], TensorType::Q8_0).is_err());
        assert!(check_range("t", &[f32::INFINITY, f32::NAN, 65504.0], TensorType::F16).is_ok());
        assert!(check_range("t", &[65520.0], TensorType::F16).is_err());
        assert!(check_range("t", &[f32::MAX], TensorType::BF16).is_err());
    }
}
