//! Writing a model whose weights include adapters: `W' = W + Σ_i s_i B_i A_i`.

use std::path::Path;

use super::adapter::LoraAdapter;
use super::linear::LoraPlan;
use crate::error::{Error, Result};
use crate::gguf::{GgufWriter, TensorBytes, TensorType, Value};
use crate::model::{Model, Slot, Target};
use crate::ops::gemm::{gemm, MatMut, MatRef};
use crate::ops::quant::{dequantize, encodes, quantize};

/// llama.cpp's `general.file_type` for files whose weights are all of one type.
fn file_type(dtype: TensorType) -> Option<u32> {
    Some(match dtype {
        TensorType::F32 => 0,
        TensorType::F16 => 1,
        TensorType::Q4_0 => 2,
        TensorType::Q4_1 => 3,
        TensorType::Q8_0 => 7,
        TensorType::Q5_0 => 8,
        TensorType::Q5_1 => 9,
        TensorType::IQ4NL => 25,
        TensorType::IQ4XS => 30,
        TensorType::BF16 => 32,
        _ => return None,
    })
}

/// Writes `path` (atomically): the model's metadata and tensors, with every adapted weight
/// replaced by its merged value. Weights keep their type (adapted ones are re-encoded in it;
/// in Q8_0 where lugh has no encoder for it, the codebook formats) unless `out_type` is given,
/// which then applies to every weight matrix.
pub fn merge(
    model: &Model,
    adapters: &[&LoraAdapter],
    path: &Path,
    out_type: Option<TensorType>,
) -> Result<()> {
    let (config, _) = model.runnable()?;
    if let Some(t) = out_type.filter(|&t| !encodes(t)) {
        return Err(Error::invalid(
            "out_type",
            format!("lugh cannot encode {t} (its encoder needs an importance matrix)"),
        ));
    }
    for adapter in adapters {
        adapter.check_fits(config)?;
    }
    let file = model.file();
    let mut writer = GgufWriter::new();
    for (key, value) in file.metadata() {
        writer.set(key, value.clone());
    }
    if let Some(id) = out_type.and_then(file_type) {
        writer.set("general.file_type", Value::U32(id));
    }
    let plan = LoraPlan::new(vec![(0..1, adapters.to_vec())]);
    for info in file.tensors() {
        let is_matrix = info.shape.len() == 2;
        let out = out_type.filter(|_| is_matrix).unwrap_or(info.dtype);
        // Each projection the tensor stores, with its adapter terms and its rows.
        let terms: Vec<_> = Target::parse(&info.name, config)
            .map(|t| {
                t.parts(config)
                    .into_iter()
                    .flat_map(|(proj, rows)| {
                        let slot = Slot {
                            layer: t.layer,
                            proj,
                        };
                        plan.terms(slot).map(move |term| (term, rows.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if terms.is_empty() && out == info.dtype {
            writer.add_tensor(
                &info.name,
                info.dtype,
                &info.shape,
                TensorBytes::View(file.tensor_data(info)),
            )?;
            continue;
        }
        let out = if encodes(out) { out } else { TensorType::Q8_0 };
        if out.row_bytes(*info.shape.last().unwrap_or(&1)).is_none() {
            return Err(Error::invalid(
                "out_type",
                format!(
                    "{out} blocks do not divide the rows of '{}' ({:?})",
                    info.name, info.shape
                ),
            ));
        }
        let mut weight = dequantize(info.dtype, &file.tensor_data(info), info.n_elements());
        for (term, rows) in &terms {
            let (pair, n_out) = (term.pair, term.n_out());
            let scaled_b: Vec<f32> = term.b().iter().map(|b| b * term.scaling).collect();
            gemm(
                MatRef::new(&scaled_b, n_out, pair.rank),
                MatRef::new(&pair.lora_a, pair.rank, pair.n_in),
                MatMut::new(
                    &mut weight[rows.start * pair.n_in..rows.end * pair.n_in],
                    n_out,
                    pair.n_in,
                ),
                true,
                true,
            );
        }
        writer.add_tensor(
            &info.name,
            out,
            &info.shape,
            TensorBytes::Owned(quantize(out, &weight)),
        )?;
    }
    drop(plan);
    writer.write(path)
}
