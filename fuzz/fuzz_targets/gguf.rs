//! Any bytes as a GGUF file: parsed, tensors converted, opened as a model (run if it is one),
//! a tokenizer, and a LoRA adapter of a tiny model.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lugh::fuzzing;
use lugh::{GgufFile, Model};

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let file = GgufFile::from_bytes(&fuzzing::tiny_model()).expect("the tiny model parses");
        Model::from_gguf(file).expect("the tiny model opens")
    })
}

fuzz_target!(|data: &[u8]| {
    fuzzing::gguf(data, Some(model()));
});
