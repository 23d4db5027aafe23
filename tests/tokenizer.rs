//! The tokenizer against llama.cpp: its tokenizer test vectors for three vocabularies, the
//! token ids it gives for the tiny test models and the demo model, round trips, and errors.

use std::path::{Path, PathBuf};

use lugh::gguf::{GgufWriter, Value, ValueType};
use lugh::{Error, GgufFile, Tokenizer};
use serde_json::Value as Json;

fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn tokenizer(relative: &str) -> Tokenizer {
    let file = GgufFile::open(fixture(relative), true).unwrap();
    Tokenizer::from_gguf(&file).unwrap()
}

fn json(relative: &str) -> Json {
    serde_json::from_str(&std::fs::read_to_string(fixture(relative)).unwrap()).unwrap()
}

fn ids(value: &Json) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|id| u32::try_from(id.as_u64().unwrap()).unwrap())
        .collect()
}

/// llama.cpp's test vectors `X.gguf.inp` / `X.gguf.out`, read as its
/// tests/test-tokenizer-0.cpp reads them: texts separated by "\n__ggml_vocab_test__\n" (each
/// text keeps its own leading and trailing newlines), one line of ids per text.
fn vectors(vocab: &str) -> Vec<(String, Vec<u32>)> {
    let base = fixture(&format!("tests/fixtures/vocab/{vocab}"));
    let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(base.with_extension("gguf.out")).unwrap();
    let separator = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(separator) {
            Some(at) => {
                texts.push(rest[..at].to_string());
                rest = &rest[at + separator.len()..];
            }
            None => {
                texts.push(rest.to_string());
                rest = "";
            }
        }
    }
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|id| id.parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(
        texts.len(),
        expected.len(),
        "{vocab}: .inp and .out disagree"
    );
    texts.into_iter().zip(expected).collect()
}

/// Every vector of `vocab` encodes (no BOS, no special parsing, as llama.cpp's test runs) to
/// its ids; returns how many there were.
fn check_vectors(vocab: &str) -> usize {
    let tokenizer = tokenizer(&format!("tests/fixtures/vocab/{vocab}"));
    let vectors = vectors(vocab);
    let failures: Vec<String> = vectors
        .iter()
        .filter_map(|(text, expected)| {
            let got = tokenizer.encode(text, false, false);
            (&got != expected)
                .then(|| format!("{text:?}\n  expected {expected:?}\n  got      {got:?}"))
        })
        .collect();
    assert!(failures.is_empty(), "{vocab}:\n{}", failures.join("\n"));
    vectors.len()
}

#[test]
fn llama_spm_vectors() {
    assert_eq!(check_vectors("ggml-vocab-llama-spm.gguf"), 46);
}

#[test]
fn llama_bpe_vectors() {
    assert_eq!(check_vectors("ggml-vocab-llama-bpe.gguf"), 46);
}

#[test]
fn gpt2_vectors() {
    assert_eq!(check_vectors("ggml-vocab-gpt-2.gguf"), 46);
}

#[test]
fn tiny_models_match_llama_cpp_and_sentencepiece() {
    for model in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let tokenizer = tokenizer(&format!("tests/fixtures/{model}/base-f32.gguf"));
        let reference = json(&format!("tests/fixtures/{model}/tokenizer_reference.json"));
        let texts = reference["texts"].as_array().unwrap();
        assert_eq!(texts.len(), 8);
        for (i, text) in texts.iter().enumerate() {
            let text = text.as_str().unwrap();
            let with_bos = ids(&reference["llamacpp_ids_add_bos"][i]);
            let without_bos = ids(&reference["sentencepiece_ids"][i]);
            assert_eq!(
                tokenizer.encode(text, true, false),
                with_bos,
                "{model}: {text:?}"
            );
            assert_eq!(
                tokenizer.encode(text, false, false),
                without_bos,
                "{model}: {text:?}"
            );
        }
    }
}

#[test]
fn demo_models_match_llama_cpp() {
    let greedy = json("tests/fixtures/models/llamacpp_greedy.json");
    for (file, path) in [
        (
            "lugh-demo-4m-f16.gguf",
            "python/lugh/data/lugh-demo-4m-f16.gguf",
        ),
        (
            "lugh-demo-4m-q8_0.gguf",
            "tests/fixtures/models/lugh-demo-4m-q8_0.gguf",
        ),
    ] {
        let tokenizer = tokenizer(path);
        let runs = greedy[file].as_array().unwrap();
        assert_eq!(runs.len(), 3);
        for run in runs {
            let prompt = run["prompt"].as_str().unwrap();
            let prompt_ids = ids(&run["prompt_ids"]);
            assert_eq!(
                tokenizer.encode(prompt, true, false),
                prompt_ids,
                "{file}: {prompt:?}"
            );

            // llama.cpp's continuation text is its tokens' pieces, one after another.
            let greedy_ids = ids(&run["greedy_ids"]);
            let greedy_text = run["greedy_text"].as_str().unwrap();
            let pieces: Vec<u8> = greedy_ids
                .iter()
                .flat_map(|&id| tokenizer.token_to_piece(id, false).unwrap().to_vec())
                .collect();
            assert_eq!(String::from_utf8(pieces).unwrap(), greedy_text);
            let all: Vec<u32> = prompt_ids.iter().chain(&greedy_ids).copied().collect();
            assert_eq!(
                tokenizer.decode(&all).unwrap(),
                format!("{prompt}{greedy_text}")
            );
        }
    }
}

const ROUND_TRIP_TEXTS: &[&str] = &[
    "Hello world",
    " leading space",
    "  multiple   spaces  and trailing  ",
    "tabs\tand\nnewlines\n\n\r\n",
    "emoji 🦙🚀 😶\u{200d}🌫️ ✅",
    "CJK 我想在apple工作 日本語 한국어",
    "Ünïcödé café naïve Cửa Việt нещо",
    "x",
    "",
];

#[test]
fn decode_inverts_encode() {
    for vocab in [
        "tests/fixtures/vocab/ggml-vocab-llama-spm.gguf",
        "tests/fixtures/vocab/ggml-vocab-llama-bpe.gguf",
        "tests/fixtures/vocab/ggml-vocab-gpt-2.gguf",
        "tests/fixtures/models/lugh-demo-4m-q8_0.gguf",
    ] {
        let tokenizer = tokenizer(vocab);
        for text in ROUND_TRIP_TEXTS {
            for add_special in [false, true] {
                let ids = tokenizer.encode(text, add_special, false);
                assert_eq!(
                    &tokenizer.decode(&ids).unwrap(),
                    text,
                    "{vocab}, add_special {add_special}"
                );
            }
        }
    }
}

#[test]
fn detokenize_is_llama_cpps() {
    let spm = tokenizer("tests/fixtures/vocab/ggml-vocab-llama-spm.gguf");
    let with_bos = spm.encode("Hello world", true, false);
    assert_eq!(with_bos, [1, 15043, 3186]);
    // llama.cpp keeps the prefix space after a BOS, dropped or rendered empty.
    assert_eq!(
        spm.detokenize(&with_bos, true, false).unwrap(),
        b" Hello world"
    );
    assert_eq!(
        spm.detokenize(&with_bos, false, false).unwrap(),
        b" Hello world"
    );
    assert_eq!(
        spm.detokenize(&with_bos, false, true).unwrap(),
        b"<s> Hello world"
    );
    assert_eq!(
        spm.detokenize(&with_bos[1..], false, false).unwrap(),
        b"Hello world"
    );

    // Byte-level BPE cleans up spaces before punctuation, as Hugging Face does.
    let bpe = tokenizer("tests/fixtures/vocab/ggml-vocab-llama-bpe.gguf");
    let ids = bpe.encode("Hello , world ! I 've", false, false);
    assert_eq!(
        bpe.detokenize(&ids, false, false).unwrap(),
        b"Hello, world! I've"
    );
}

#[test]
fn special_tokens_are_parsed_only_on_request() {
    let spm = tokenizer("tests/fixtures/vocab/ggml-vocab-llama-spm.gguf");
    // After a special token the text gets SentencePiece's prefix space again: "▁Hello".
    assert_eq!(spm.encode("<s>Hello</s>", false, true), [1, 15043, 2]);
    let plain = spm.encode("<s>Hello</s>", false, false);
    assert!(!plain.contains(&1) && !plain.contains(&2), "{plain:?}");
    assert_eq!(spm.decode(&plain).unwrap(), "<s>Hello</s>");

    let bpe = tokenizer("tests/fixtures/vocab/ggml-vocab-llama-bpe.gguf");
    let ids = bpe.encode(
        "<|start_header_id|>user<|end_header_id|>Hi<|eot_id|>",
        true,
        true,
    );
    assert_eq!(ids[..2], [128000, 128006]);
    assert_eq!(ids[ids.len() - 1], 128009);
    assert_eq!(bpe.decode(&ids).unwrap(), "userHi");
    assert_eq!(
        bpe.detokenize(&ids, false, true).unwrap(),
        b"<|begin_of_text|><|start_header_id|>user<|end_header_id|>Hi<|eot_id|>"
    );
}

#[test]
fn special_ids_and_end_of_generation() {
    let spm = tokenizer("tests/fixtures/vocab/ggml-vocab-llama-spm.gguf");
    assert_eq!(
        (spm.n_vocab(), spm.bos_id(), spm.eos_id()),
        (32000, Some(1), Some(2))
    );
    assert!(spm.is_eog(2) && !spm.is_eog(1) && !spm.is_eog(0));

    let bpe = tokenizer("tests/fixtures/vocab/ggml-vocab-llama-bpe.gguf");
    assert_eq!(
        (bpe.n_vocab(), bpe.bos_id(), bpe.eos_id()),
        (128256, Some(128000), Some(128001))
    );
    // <|end_of_text|> is EOS; <|eot_id|> llama.cpp finds by its text. This LLaMA 3.0
    // vocabulary has no <|eom_id|>: 128008 is a reserved token.
    assert!(bpe.is_eog(128001) && bpe.is_eog(128009));
    assert!(!bpe.is_eog(128000) && !bpe.is_eog(128008) && !bpe.is_eog(13));

    let gpt2 = tokenizer("tests/fixtures/vocab/ggml-vocab-gpt-2.gguf");
    assert_eq!((gpt2.bos_id(), gpt2.eos_id()), (Some(50256), Some(50256)));
    assert!(gpt2.is_eog(50256));
    // GPT-2 adds no BOS.
    assert_eq!(gpt2.encode("Hello", true, false), [15496]);
}

#[test]
fn pieces_are_bytes() {
    let spm = tokenizer("tests/fixtures/vocab/ggml-vocab-llama-spm.gguf");
    assert_eq!(spm.token_to_piece(15043, false).unwrap(), b" Hello");
    assert_eq!(spm.token_to_piece(13, false).unwrap(), b"\n"); // <0x0A>
    assert_eq!(spm.token_to_piece(243, false).unwrap(), [0xF0]); // <0xF0>: part of a character
    assert_eq!(spm.token_to_piece(1, false).unwrap(), b"");
    assert_eq!(spm.token_to_piece(1, true).unwrap(), b"<s>");

    let gpt2 = tokenizer("tests/fixtures/vocab/ggml-vocab-gpt-2.gguf");
    assert_eq!(gpt2.token_to_piece(15496, false).unwrap(), b"Hello");
    assert_eq!(gpt2.token_to_piece(220, false).unwrap(), b" ");
}

#[test]
fn out_of_range_ids_are_errors() {
    let spm = tokenizer("tests/fixtures/vocab/ggml-vocab-llama-spm.gguf");
    let is_out_of_range = |result: Result<_, Error>| {
        matches!(
            result,
            Err(Error::TokenOutOfRange {
                token: 32000,
                n_vocab: 32000
            })
        )
    };
    assert!(is_out_of_range(spm.decode(&[15043, 32000]).map(|_| ())));
    assert!(is_out_of_range(
        spm.detokenize(&[32000], true, true).map(|_| ())
    ));
    assert!(is_out_of_range(spm.token_to_piece(32000, true).map(|_| ())));
}

#[test]
fn unsupported_tokenizer_models_are_named() {
    for model in ["bert", "t5", "rwkv", "no_vocab"] {
        let mut writer = GgufWriter::new();
        writer.set("tokenizer.ggml.model", model);
        writer.set(
            "tokenizer.ggml.tokens",
            Value::Array {
                item_type: ValueType::String,
                items: vec!["[PAD]".into(), "a".into()],
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.gguf");
        writer.write(&path).unwrap();
        let error = Tokenizer::from_gguf(&GgufFile::open(&path, true).unwrap()).unwrap_err();
        assert!(
            matches!(&error, Error::Unsupported { what: "tokenizer model", feature, .. } if feature == model),
            "{error}"
        );
        assert!(error.to_string().contains(model), "{error}");
    }
}
