//! A model's weights on a candle device: quantized matrices stay quantized (`QTensor`, the
//! file's bytes), half and f32 matrices keep their type; norms and biases in f32.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;
use crate::gguf::TensorType;
use crate::model::{Proj, Weights};
use crate::ops::{Numerics, Weight};

/// A frozen matrix `[n_out, n_in]` on the device.
pub enum DeviceWeight {
    Quantized {
        qtensor: Arc<QTensor>,
        qmatmul: QMatMul,
    },
    /// f32, f16 or bf16, as stored in the file.
    Dense(Tensor),
    /// On the CPU, the formats whose candle kernels round the activations otherwise than ggml
    /// (Q8_0: in blocks of 256; Q4_1, Q5_1: Q8_1's sums in f16 arithmetic) or need `sdot`
    /// on aarch64 (Q2_K, Q3_K): lugh's own.
    Host(Weight),
}

/// Candle's name for `dtype`; None for the types candle does not read (IQ4_NL, IQ4_XS, the
/// codebook formats).
fn ggml_dtype(dtype: TensorType) -> Option<GgmlDType> {
    Some(match dtype {
        TensorType::F32 => GgmlDType::F32,
        TensorType::F16 => GgmlDType::F16,
        TensorType::BF16 => GgmlDType::BF16,
        TensorType::Q4_0 => GgmlDType::Q4_0,
        TensorType::Q4_1 => GgmlDType::Q4_1,
        TensorType::Q5_0 => GgmlDType::Q5_0,
        TensorType::Q5_1 => GgmlDType::Q5_1,
        TensorType::Q8_0 => GgmlDType::Q8_0,
        TensorType::Q2K => GgmlDType::Q2K,
        TensorType::Q3K => GgmlDType::Q3K,
        TensorType::Q4K => GgmlDType::Q4K,
        TensorType::Q5K => GgmlDType::Q5K,
        TensorType::Q6K => GgmlDType::Q6K,
        _ => return None,
    })
}

impl DeviceWeight {
    /// Uploads `weight`'s bytes as they lie in the file; a type candle cannot read, decoded
    /// to f32.
    pub fn upload(weight: &Weight, device: &Device) -> Result<DeviceWeight> {
        let shape = (weight.n_rows, weight.n_cols);
        let host_rounding = matches!(
            weight.dtype,
            TensorType::Q8_0
                | TensorType::Q4_1
                | TensorType::Q5_1
                | TensorType::Q2K
                | TensorType::Q3K
        );
        if device.is_cpu() && host_rounding {
            return Ok(DeviceWeight::Host(weight.clone()));
        }
        let bytes: &[u8] = weight.data();
        let dense =
            |dtype: DType| Tensor::from_raw_buffer(bytes, dtype, &[shape.0, shape.1], device);
        Ok(match weight.dtype {
            TensorType::F32 => DeviceWeight::Dense(dense(DType::F32)?),
            TensorType::F16 => DeviceWeight::Dense(dense(DType::F16)?),
            TensorType::BF16 => DeviceWeight::Dense(dense(DType::BF16)?),
            dtype => {
                let Some(ggml) = ggml_dtype(dtype) else {
                    let values = weight.to_f32();
                    return Ok(DeviceWeight::Dense(Tensor::from_vec(
                        values, shape, device,
                    )?));
                };
                let storage = QStorage::from_data(Cow::Borrowed(bytes), device, ggml)?;
                let qtensor = Arc::new(QTensor::new(storage, shape)?);
                let qmatmul = QMatMul::from_arc(Arc::clone(&qtensor))?;
                DeviceWeight::Quantized { qtensor, qmatmul }
            }
        })
    }

    /// The matrix in f32 (dequantized on the device, for exact products and the backward).
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            DeviceWeight::Quantized { qtensor, .. } => qtensor.dequantize(&qtensor.device())?,
            DeviceWeight::Dense(w) => w.to_dtype(DType::F32)?,
            DeviceWeight::Host(w) => {
                Tensor::from_vec(w.to_f32(), (w.n_rows, w.n_cols), &Device::Cpu)?
            }
        })
    }

    /// `x Wᵀ` (`x` `[rows, n_in]` f32). Ggml numerics: candle's quantized kernels (activations
    /// rounded to 8-bit blocks as ggml does) and half weights times half activations.
    pub fn matmul(&self, x: &Tensor, numerics: Numerics) -> Result<Tensor> {
        Ok(match (self, numerics) {
            (DeviceWeight::Host(w), numerics) => {
                let (rows, x) = (x.dim(0)?, x.flatten_all()?.to_vec1::<f32>()?);
                let mut y = vec![0f32; rows * w.n_rows];
                w.product(numerics, &x, &mut y);
                Tensor::from_vec(y, (rows, w.n_rows), &Device::Cpu)?
            }
            (DeviceWeight::Quantized { qmatmul, .. }, Numerics::Ggml) => qmatmul.forward(x)?,
            (DeviceWeight::Dense(w), Numerics::Ggml) if w.dtype() != DType::F32 => x
                .to_dtype(w.dtype())?
                .matmul(&w.t()?)?
                .to_dtype(DType::F32)?,
            (_, Numerics::Bf16) => bf16_product(x, &self.to_f32()?.t()?)?,
            (DeviceWeight::Dense(w), _) if w.dtype() == DType::F32 => x.matmul(&w.t()?)?,
            _ => x.matmul(&self.to_f32()?.t()?)?,
        })
    }

    /// `dy W` (`dy` `[rows, n_out]` f32) for the backward: f32, or bf16 operands with
    /// `Numerics::Bf16`.
    pub fn backward_input(&self, dy: &Tensor, numerics: Numerics) -> Result<Tensor> {
        let w = self.to_f32()?;
        Ok(match numerics {
            Numerics::Bf16 => bf16_product(dy, &w)?,
            Numerics::Ggml | Numerics::Exact => dy.matmul(&w)?,
        })
    }
}

/// `a b` on bf16-rounded operands, returned in f32.
fn bf16_product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.to_dtype(DType::BF16)?
        .matmul(&b.to_dtype(DType::BF16)?)?
        .to_dtype(DType::F32)
}

/// One block's weights on the device.
pub struct DeviceLayer {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub post_attn_norm: Option<Tensor>,
    pub post_ffn_norm: Option<Tensor>,
    projections: Vec<DeviceWeight>,
    biases: Vec<Option<Tensor>>,
}

impl DeviceLayer {
    pub fn weight(&self, proj: Proj) -> &DeviceWeight {
        &self.projections[proj as usize]
    }

    pub fn bias(&self, proj: Proj) -> Option<&Tensor> {
        self.biases[proj as usize].as_ref()
    }
}

/// Every weight the recipe reads on the device, except the embedding, whose rows are looked
/// up on the host (only the batch's rows travel).
pub struct DeviceWeights {
    pub layers: Vec<DeviceLayer>,
    pub output_norm: Tensor,
    pub output: DeviceWeight,
}

fn vector(values: &[f32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(values, values.len(), device)?)
}

impl DeviceWeights {
    pub fn upload(weights: &Weights, device: &Device) -> Result<DeviceWeights> {
        let layers = weights
            .layers
            .iter()
            .map(|layer| {
                Ok(DeviceLayer {
                    attn_norm: vector(&layer.attn_norm, device)?,
                    ffn_norm: vector(&layer.ffn_norm, device)?,
                    q_norm: optional_vector(layer.q_norm.as_deref(), device)?,
                    k_norm: optional_vector(layer.k_norm.as_deref(), device)?,
                    post_attn_norm: optional_vector(layer.post_attn_norm.as_deref(), device)?,
                    post_ffn_norm: optional_vector(layer.post_ffn_norm.as_deref(), device)?,
                    projections: Proj::ALL
                        .iter()
                        .map(|&p| DeviceWeight::upload(layer.weight(p), device))
                        .collect::<Result<_>>()?,
                    biases: Proj::ALL
                        .iter()
                        .map(|&p| layer.bias(p).map(|b| vector(b, device)).transpose())
                        .collect::<Result<_>>()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(DeviceWeights {
            layers,
            output_norm: vector(&weights.output_norm, device)?,
            output: DeviceWeight::upload(&weights.output, device)?,
        })
    }
}

fn optional_vector(values: Option<&[f32]>, device: &Device) -> Result<Option<Tensor>> {
    values.map(|w| vector(w, device)).transpose()
}
