//! Tokenizers from crafted vocabularies: merge order, byte fallback, special tokens, the
//! metadata defaults, and one test per way a vocabulary can be refused.

use super::*;
use crate::gguf::{GgufWriter, Value, ValueType};

// gpt-2's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

fn strings(items: &[&str]) -> Value {
    Value::Array {
        item_type: ValueType::String,
        items: items.iter().map(|&s| s.into()).collect(),
    }
}

/// A GGUF holding `tokens` (text, score, type) and `keys`, opened as a tokenizer.
fn build(model: &str, tokens: &[(&str, f32, i32)], keys: &[(&str, Value)]) -> Result<Tokenizer> {
    let mut writer = GgufWriter::new();
    writer.set("tokenizer.ggml.model", model);
    let texts: Vec<&str> = tokens.iter().map(|t| t.0).collect();
    writer.set("tokenizer.ggml.tokens", strings(&texts));
    writer.set(
        "tokenizer.ggml.scores",
        Value::Array {
            item_type: ValueType::F32,
            items: tokens.iter().map(|t| Value::F32(t.1)).collect(),
        },
    );
    writer.set(
        "tokenizer.ggml.token_type",
        Value::Array {
            item_type: ValueType::I32,
            items: tokens.iter().map(|t| Value::I32(t.2)).collect(),
        },
    );
    for (key, value) in keys {
        writer.set(key, value.clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vocab.gguf");
    writer.write(&path).unwrap();
    Tokenizer::from_gguf(&GgufFile::open(&path, true).unwrap())
}

/// `<unk>`, `<s>`, `</s>`, then `tokens` as normal tokens with their scores.
fn spm(tokens: &[(&str, f32)]) -> Tokenizer {
    let mut all = vec![
        ("<unk>", 0.0, UNKNOWN),
        ("<s>", 0.0, CONTROL),
        ("</s>", 0.0, CONTROL),
    ];
    all.extend(tokens.iter().map(|&(text, score)| (text, score, NORMAL)));
    build("llama", &all, &[]).unwrap()
}

/// Byte-level tokens (all normal) with `merges`, pre-tokenizer `pre`.
fn gpt2(tokens: &[&str], merges: &[&str], pre: &str) -> Tokenizer {
    let all: Vec<(&str, f32, i32)> = tokens.iter().map(|&t| (t, 0.0, NORMAL)).collect();
    let keys = [
        ("tokenizer.ggml.merges", strings(merges)),
        ("tokenizer.ggml.pre", pre.into()),
    ];
    build("gpt2", &all, &keys).unwrap()
}

#[test]
fn sentencepiece_merges_the_highest_score_first() {
    // "abc" is "▁abc": "bc" outscores "▁a" and "ab", then "▁a" merges.
    let tokens = [("▁", -5.0), ("a", -5.0), ("b", -5.0), ("c", -5.0)];
    let by_bc = spm(&[
        tokens.as_slice(),
        &[("▁a", -1.0), ("ab", -2.0), ("bc", -0.5)],
    ]
    .concat());
    assert_eq!(by_bc.encode("abc", false, false), [7, 9]);
    // With "ab" best, "▁" and "c" are left alone (no "▁ab" or "abc" token).
    let by_ab = spm(&[
        tokens.as_slice(),
        &[("▁a", -1.0), ("ab", -0.1), ("bc", -0.5)],
    ]
    .concat());
    assert_eq!(by_ab.encode("abc", false, false), [3, 8, 6]);
    assert_eq!(by_ab.encode("abc", true, false), [1, 3, 8, 6]);
}

#[test]
fn sentencepiece_falls_back_to_bytes_then_unknown() {
    // 'é' is C3 A9; the vocabulary has a token for C3 only, so A9 becomes <unk>.
    let tokenizer = spm(&[("▁", 0.0), ("<0xC3>", 0.0)]);
    assert_eq!(tokenizer.encode("é", false, false), [3, 4, 0]);
}

#[test]
fn byte_level_bpe_merges_the_earliest_rank_first() {
    let tokens = ["a", "b", "c", "ab", "bc", "abc"];
    assert_eq!(
        gpt2(&tokens, &["b c", "a b"], "gpt-2").encode("abc", false, false),
        [0, 4]
    );
    assert_eq!(
        gpt2(&tokens, &["a b", "ab c", "b c"], "gpt-2").encode("abc", false, false),
        [5]
    );
}

#[test]
fn llama3_takes_whole_words_that_are_tokens() {
    // No merge makes "ab", but LLaMA 3's pre-tokenizer settings ignore merges for whole words.
    let tokens = ["a", "b", "ab"];
    assert_eq!(
        gpt2(&tokens, &[], "gpt-2").encode("ab", false, false),
        [0, 1]
    );
    let llama3 = build(
        "gpt2",
        &[
            ("a", 0.0, NORMAL),
            ("b", 0.0, NORMAL),
            ("ab", 0.0, NORMAL),
            ("<s>", 0.0, CONTROL),
        ],
        &[
            ("tokenizer.ggml.merges", strings(&[])),
            ("tokenizer.ggml.pre", "llama-bpe".into()),
            ("tokenizer.ggml.bos_token_id", Value::U32(3)),
        ],
    )
    .unwrap();
    assert_eq!(llama3.encode("ab", true, false), [3, 2]);
}

#[test]
fn user_defined_tokens_always_split_control_tokens_on_request() {
    let special = build(
        "llama",
        &[
            ("<unk>", 0.0, UNKNOWN),
            ("<s>", 0.0, CONTROL),
            ("</s>", 0.0, CONTROL),
            ("▁", 0.0, NORMAL),
            ("x", 0.0, NORMAL),
            ("y", 0.0, NORMAL),
            ("<tool>", 0.0, USER_DEFINED),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(special.encode("x<tool>y", false, false), [3, 4, 6, 3, 5]);
    assert_eq!(special.encode("x</s>", false, true), [3, 4, 2]);
}

#[test]
fn end_of_generation_texts_become_control_tokens() {
    // A converter left <|im_end|> normal: llama.cpp makes it a control token that ends
    // generation, so it renders empty and is parsed only on request.
    let tokenizer = gpt2(&["a", "<|im_end|>"], &[], "qwen2");
    assert!(tokenizer.is_eog(1) && !tokenizer.is_eog(0));
    assert_eq!(tokenizer.token_to_piece(1, false).unwrap(), b"");
    assert_eq!(tokenizer.token_to_piece(1, true).unwrap(), b"<|im_end|>");
    assert_eq!(tokenizer.encode("a<|im_end|>", false, true), [0, 1]);
    assert_ne!(tokenizer.encode("a<|im_end|>", false, false), [0, 1]);
}

#[test]
fn harmony_end_does_not_end_generation() {
    let tokens = ["<|return|>", "<|call|>", "<|end|>", "<|endoftext|>"];
    let tokenizer = gpt2(&tokens, &[], "gpt-4o");
    assert!(tokenizer.is_eog(0) && tokenizer.is_eog(1) && tokenizer.is_eog(3));
    assert!(!tokenizer.is_eog(2));
    // Without <|return|> and <|call|>, <|end|> ends generation.
    assert!(gpt2(&["<|end|>"], &[], "gpt-4o").is_eog(0));
}

#[test]
fn metadata_overrides_defaults_within_the_vocabulary() {
    let tokens = [
        ("<unk>", 0.0, UNKNOWN),
        ("<s>", 0.0, CONTROL),
        ("</s>", 0.0, CONTROL),
    ];
    let keys = |bos: u32| {
        [
            ("tokenizer.ggml.bos_token_id", Value::U32(bos)),
            ("tokenizer.ggml.add_bos_token", false.into()),
            ("tokenizer.ggml.add_eos_token", true.into()),
        ]
    };
    let tokenizer = build("llama", &tokens, &keys(2)).unwrap();
    assert_eq!(tokenizer.bos_id(), Some(2));
    // No BOS, but EOS.
    assert_eq!(tokenizer.encode("", true, false), [2]);
    // An id past the vocabulary keeps the default (llama.cpp warns).
    assert_eq!(
        build("llama", &tokens, &keys(99)).unwrap().bos_id(),
        Some(1)
    );
}

fn refusal(model: &str, tokens: &[(&str, f32, i32)], keys: &[(&str, Value)]) -> Error {
    build(model, tokens, keys).unwrap_err()
}

#[test]
fn unknown_pre_tokenizer_is_refused() {
    let keys = [
        ("tokenizer.ggml.merges", strings(&[])),
        ("tokenizer.ggml.pre", "no-such-pre".into()),
    ];
    let error = refusal("gpt2", &[("a", 0.0, NORMAL)], &keys);
    assert!(
        matches!(&error, Error::Unsupported { what: "pre-tokenizer", feature, .. } if feature == "no-such-pre"),
        "{error}"
    );
}

#[test]
fn missing_keys_are_named() {
    let error = refusal("gpt2", &[("a", 0.0, NORMAL)], &[]);
    assert!(
        matches!(&error, Error::MissingKey { key } if key == "tokenizer.ggml.merges"),
        "{error}"
    );
    let mut writer = GgufWriter::new();
    writer.set("tokenizer.ggml.tokens", strings(&["a"]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vocab.gguf");
    writer.write(&path).unwrap();
    let error = Tokenizer::from_gguf(&GgufFile::open(&path, true).unwrap()).unwrap_err();
    assert!(
        matches!(&error, Error::MissingKey { key } if key == "tokenizer.ggml.model"),
        "{error}"
    );
}

#[test]
fn adding_a_token_the_vocabulary_lacks_is_refused() {
    // ChatGLM has no default BOS.
    let keys = [
        ("tokenizer.ggml.merges", strings(&[])),
        ("tokenizer.ggml.pre", "chatglm-bpe".into()),
        ("tokenizer.ggml.add_bos_token", true.into()),
    ];
    let error = refusal("gpt2", &[("a", 0.0, NORMAL)], &keys);
    assert!(
        matches!(&error, Error::Malformed { reason, .. } if reason.contains("add_bos_token")),
        "{error}"
    );
}

#[test]
fn broken_token_lists_are_refused() {
    let duplicate = refusal("llama", &[("a", 0.0, NORMAL), ("a", 0.0, NORMAL)], &[]);
    assert!(
        matches!(&duplicate, Error::Malformed { reason, .. } if reason.contains("twice")),
        "{duplicate}"
    );
    let with_bad_byte = [
        ("<unk>", 0.0, UNKNOWN),
        ("<s>", 0.0, CONTROL),
        ("</s>", 0.0, CONTROL),
        ("<0xZZ>", 0.0, BYTE),
    ];
    let bad_byte = refusal("llama", &with_bad_byte, &[]);
    assert!(
        matches!(&bad_byte, Error::Malformed { reason, .. } if reason.contains("<0xZZ>")),
        "{bad_byte}"
    );
    let short_scores = [(
        "tokenizer.ggml.scores",
        Value::Array {
            item_type: ValueType::F32,
            items: vec![Value::F32(0.0)],
        },
    )];
    let short = refusal(
        "llama",
        &[("a", 0.0, NORMAL), ("b", 0.0, NORMAL)],
        &short_scores,
    );
    assert!(
        matches!(&short, Error::Malformed { reason, .. } if reason.contains("scores")),
        "{short}"
    );
    let not_strings = [("tokenizer.ggml.tokens", Value::U32(3))];
    let wrong = refusal("llama", &[("a", 0.0, NORMAL)], &not_strings);
    assert!(
        matches!(&wrong, Error::WrongValueType { key, .. } if key == "tokenizer.ggml.tokens"),
        "{wrong}"
    );
}

#[test]
fn tokenizers_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Tokenizer>();
}
