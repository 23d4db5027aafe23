//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): each takes raw bytes as a file
//! would hold them and runs everything lugh does with such a file. Errors are expected and
//! ignored; a panic, an abort or an out-of-bounds access is a bug. Not a stable API.

use std::sync::Arc;

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::infer::Inference;
use crate::lora::{self, LoraAdapter};
use crate::model::Model;
use crate::ops::quant::tensor_f32;
use crate::tokenizer::Tokenizer;

/// Inputs larger than this are not run through a forward (a fuzzer's inputs are small; a
/// forward over a large valid model would only slow it down).
const MAX_FORWARD_BYTES: usize = 1 << 20;

/// A GGUF file: parsed, every tensor converted to f32, opened as a model (and run for two
/// tokens if it is one), as a tokenizer, and as a LoRA adapter of `model`.
pub fn gguf(bytes: &[u8], model: Option<&Model>) {
    let Ok(file) = GgufFile::from_bytes(bytes) else {
        return;
    };
    for info in file.tensors() {
        let values = tensor_f32(&file, info);
        assert_eq!(values.len(), info.n_elements());
    }
    let _ = Tokenizer::from_gguf(&file);
    if let Some(model) = model {
        let _ = lora::gguf_adapter_from_gguf(&file, model, 1.0);
    }
    if let Ok(model) = Model::from_gguf(file) {
        if model.runnable().is_ok() && bytes.len() <= MAX_FORWARD_BYTES {
            let _ = forward(Arc::new(model), None);
        }
    }
}

/// A PEFT adapter: `adapter_model.safetensors` bytes and `adapter_config.json` bytes (or
/// none), for `model`; if it loads, one forward with it.
pub fn peft(weights: &[u8], config: Option<&[u8]>, model: &Arc<Model>) {
    let config = match config.map(lora::PeftConfig::parse).transpose() {
        Ok(config) => config,
        Err(_) => return,
    };
    if let Ok(adapter) = lora::peft_from_safetensors(weights, config.as_ref(), model, 1.0) {
        let _ = forward(Arc::clone(model), Some(&adapter));
    }
}

fn forward(model: Arc<Model>, adapter: Option<&LoraAdapter>) -> Result<Vec<f32>> {
    let inference = Inference::new(model, Some(8), Some(1))?;
    let adapters: Vec<&LoraAdapter> = adapter.into_iter().collect();
    let tokens = [0, (inference.config().n_vocab.saturating_sub(1)) as u32];
    inference.forward(&tokens, &adapters)
}

/// A one-layer LLaMA small enough to flip every byte of its header (n_vocab 4, n_embd 8,
/// 2 heads of 4, 1 key/value head, n_ff 16): with the adapters below, the seeds of the fuzz
/// targets and of the tests at the end.
pub fn tiny_model() -> Vec<u8> {
    tiny_model_with(&[])
}

/// `tiny_model` with metadata set or replaced.
pub fn tiny_model_with(metadata: &[(&str, crate::gguf::Value)]) -> Vec<u8> {
    use crate::gguf::{GgufWriter, Value};
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama");
    for (key, value) in [
        ("block_count", 1),
        ("context_length", 16),
        ("embedding_length", 8),
        ("feed_forward_length", 16),
        ("attention.head_count", 2),
        ("attention.head_count_kv", 1),
    ] {
        w.set(&format!("llama.{key}"), Value::U32(value));
    }
    w.set("llama.attention.layer_norm_rms_epsilon", 1e-5f32);
    for (key, value) in metadata {
        w.set(key, value.clone());
    }
    let mut seed = 1u32;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    for (name, shape) in [
        ("token_embd.weight", &[4, 8][..]),
        ("output_norm.weight", &[8]),
        ("blk.0.attn_norm.weight", &[8]),
        ("blk.0.ffn_norm.weight", &[8]),
        ("blk.0.attn_q.weight", &[8, 8]),
        ("blk.0.attn_k.weight", &[4, 8]),
        ("blk.0.attn_v.weight", &[4, 8]),
        ("blk.0.attn_output.weight", &[8, 8]),
        ("blk.0.ffn_gate.weight", &[16, 8]),
        ("blk.0.ffn_up.weight", &[16, 8]),
        ("blk.0.ffn_down.weight", &[8, 16]),
    ] {
        let v = values(shape.iter().product());
        w.add_f32(name, shape, &v).expect("shapes match the values");
    }
    let mut out = Vec::new();
    w.write_to(&mut out).expect("writing to memory");
    out
}

/// A llama.cpp GGUF adapter for `tiny_model`: a rank-1 pair on layer 0's attn_v.
pub fn tiny_adapter() -> Vec<u8> {
    use crate::gguf::GgufWriter;
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama");
    w.set("general.type", "adapter");
    w.set("adapter.type", "lora");
    w.set("adapter.lora.alpha", 2.0f32);
    let a: Vec<f32> = (0..8).map(|i| i as f32 * 0.1).collect();
    let b: Vec<f32> = (0..4).map(|i| 0.3 - i as f32 * 0.1).collect();
    w.add_f32("blk.0.attn_v.weight.lora_a", &[1, 8], &a)
        .expect("shape matches");
    w.add_f32("blk.0.attn_v.weight.lora_b", &[4, 1], &b)
        .expect("shape matches");
    let mut out = Vec::new();
    w.write_to(&mut out).expect("writing to memory");
    out
}

/// `adapter_model.safetensors` for `tiny_model`: a rank-1 pair on layer 0's q_proj.
pub fn tiny_peft() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let a: Vec<u8> = (0..8)
        .flat_map(|i| (i as f32 * 0.1).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..8)
        .flat_map(|i| (0.5 - i as f32 * 0.1).to_le_bytes())
        .collect();
    let prefix = "base_model.model.model.layers.0.self_attn.q_proj";
    let views = [
        (format!("{prefix}.lora_A.weight"), vec![1, 8], &a),
        (format!("{prefix}.lora_B.weight"), vec![8, 1], &b),
    ]
    .map(|(name, shape, bytes)| {
        let view = TensorView::new(Dtype::F32, shape, bytes).expect("shape matches the bytes");
        (name, view)
    });
    safetensors::serialize(views, None).expect("serializing to memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Arc<Model> {
        let file = GgufFile::from_bytes(&tiny_model()).unwrap();
        Arc::new(Model::from_gguf(file).unwrap())
    }

    #[test]
    fn the_seeds_are_a_model_and_an_adapter_for_it() {
        let model = tiny();
        let logits = forward(Arc::clone(&model), None).unwrap();
        assert_eq!(logits.len(), 4);
        let config = lora::PeftConfig::parse(br#"{"lora_alpha": 2}"#).unwrap();
        let adapter =
            lora::peft_from_safetensors(&tiny_peft(), Some(&config), &model, 1.0).unwrap();
        assert_eq!(adapter.weight_names(), ["blk.0.attn_q.weight"]);
        let adapted = forward(Arc::clone(&model), Some(&adapter)).unwrap();
        assert_ne!(adapted, logits, "the adapter changes the logits");
        let file = GgufFile::from_bytes(&tiny_adapter()).unwrap();
        let adapter = lora::gguf_adapter_from_gguf(&file, &model, 1.0).unwrap();
        assert_eq!(adapter.adapter.weight_names(), ["blk.0.attn_v.weight"]);
        let adapted = forward(model, Some(&adapter.adapter)).unwrap();
        assert_ne!(adapted, logits, "the adapter changes the logits");
    }

    /// The fuzz targets' own check, deterministic: every truncation of the tiny model and
    /// every byte of its header set to each of a few values opens, fails cleanly or runs.
    #[test]
    fn every_truncation_and_header_byte_of_a_model_is_survived() {
        let bytes = tiny_model();
        let header_len = GgufFile::from_bytes(&bytes).unwrap().tensors()[0].offset;
        let model = tiny();
        for len in 0..bytes.len() {
            gguf(&bytes[..len], Some(&model));
        }
        for at in 0..header_len {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff, bytes[at] ^ 0x10] {
                let mut changed = bytes.clone();
                changed[at] = value;
                gguf(&changed, Some(&model));
            }
        }
    }

    #[test]
    fn every_truncation_and_header_byte_of_an_adapter_is_survived() {
        let bytes = tiny_adapter();
        let header_len = GgufFile::from_bytes(&bytes).unwrap().tensors()[0].offset;
        let model = tiny();
        for len in 0..bytes.len() {
            gguf(&bytes[..len], Some(&model));
        }
        for at in 0..header_len {
            for value in [0x00, 0x01, 0x7f, 0xff, bytes[at] ^ 0x10] {
                let mut changed = bytes.clone();
                changed[at] = value;
                gguf(&changed, Some(&model));
            }
        }
    }

    #[test]
    fn every_truncation_and_header_byte_of_a_peft_file_is_survived() {
        let bytes = tiny_peft();
        let model = tiny();
        let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for len in 0..bytes.len() {
            peft(&bytes[..len], None, &model);
        }
        for at in 0..header_len {
            for value in [0x00, b'0', b'9', b'"', b'{', b'-', 0xff, bytes[at] ^ 0x01] {
                let mut changed = bytes.clone();
                changed[at] = value;
                peft(&changed, Some(b"{}"), &model);
            }
        }
    }
}
