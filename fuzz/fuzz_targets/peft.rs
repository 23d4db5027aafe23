//! Any bytes as a PEFT adapter of a tiny model: the first two bytes give the length of the
//! `adapter_config.json` that follows (0xffff: no config), the rest is
//! `adapter_model.safetensors`.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use lugh::fuzzing;
use lugh::{GgufFile, Model};

fn model() -> &'static Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let file = GgufFile::from_bytes(&fuzzing::tiny_model()).expect("the tiny model parses");
        Arc::new(Model::from_gguf(file).expect("the tiny model opens"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = u16::from_le_bytes(*len) as usize;
    let (config, weights) = if len == 0xffff {
        (None, rest)
    } else if len <= rest.len() {
        let (config, weights) = rest.split_at(len);
        (Some(config), weights)
    } else {
        return;
    };
    fuzzing::peft(weights, config, model());
});
