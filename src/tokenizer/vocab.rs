//! The token list of a GGUF vocabulary (texts, scores, types), read as llama.cpp's
//! `llama_vocab::impl::load` reads it.

use std::collections::HashMap;
use std::ops::BitOr;

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

const TOKENS: &str = "tokenizer.ggml.tokens";
const SCORES: &str = "tokenizer.ggml.scores";
const TOKEN_TYPES: &str = "tokenizer.ggml.token_type";

/// A token's attributes (llama.cpp's `llama_token_attr`): its type in the file, to which
/// loading may add `CONTROL` (end-of-generation texts a converter left normal) or which it may
/// replace (llama.cpp's per-model fixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Attr(u8);

impl Attr {
    pub const UNDEFINED: Attr = Attr(0);
    pub const UNKNOWN: Attr = Attr(1 << 0);
    pub const UNUSED: Attr = Attr(1 << 1);
    pub const NORMAL: Attr = Attr(1 << 2);
    pub const CONTROL: Attr = Attr(1 << 3);
    pub const USER_DEFINED: Attr = Attr(1 << 4);
    pub const BYTE: Attr = Attr(1 << 5);

    /// From `tokenizer.ggml.token_type` (gguf-py's `TokenType`: 1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte; anything else is undefined).
    fn from_token_type(token_type: i64) -> Attr {
        match token_type {
            1 => Attr::NORMAL,
            2 => Attr::UNKNOWN,
            3 => Attr::CONTROL,
            4 => Attr::USER_DEFINED,
            5 => Attr::UNUSED,
            6 => Attr::BYTE,
            _ => Attr::UNDEFINED,
        }
    }

    pub fn intersects(self, other: Attr) -> bool {
        self.0 & other.0 != 0
    }
}

impl BitOr for Attr {
    type Output = Attr;
    fn bitor(self, other: Attr) -> Attr {
        Attr(self.0 | other.0)
    }
}

/// The tokens, indexed by id, and the id of each text.
#[derive(Debug)]
pub(super) struct Vocab {
    pub texts: Vec<String>,
    pub scores: Vec<f32>,
    pub attrs: Vec<Attr>,
    ids: HashMap<String, u32>,
}

impl Vocab {
    pub fn from_gguf(file: &GgufFile) -> Result<Vocab> {
        let tokens = file.require(TOKENS)?.as_array(TOKENS)?;
        let n_vocab = tokens.len();
        if u32::try_from(n_vocab).is_err() {
            return Err(Error::malformed(
                "tokenizer",
                format!("{n_vocab} tokens do not fit 32-bit ids"),
            ));
        }
        let scores = match file.get(SCORES) {
            None => vec![0.0; n_vocab],
            Some(value) => per_token(value, SCORES, n_vocab, |item| match *item {
                Value::F32(score) => Ok(score),
                // llama.cpp also reads integer scores.
                Value::I32(score) => Ok(score as f32),
                ref other => Err(other.wrong_type(SCORES, "f32 or i32")),
            })?,
        };
        let attrs = match file.get(TOKEN_TYPES) {
            None => vec![Attr::NORMAL; n_vocab],
            Some(value) => per_token(value, TOKEN_TYPES, n_vocab, |item| {
                item.to_i64(TOKEN_TYPES).map(Attr::from_token_type)
            })?,
        };

        let mut texts = Vec::with_capacity(n_vocab);
        let mut ids = HashMap::with_capacity(n_vocab);
        for (id, token) in (0u32..).zip(tokens) {
            let mut text = token.as_str(TOKENS)?.to_string();
            if text.is_empty() {
                // llama.cpp's name for an empty token, so that no text maps to two ids.
                text = format!("[EMPTY_{id}]");
            }
            if let Some(first) = ids.insert(text.clone(), id) {
                return Err(Error::malformed(
                    "tokenizer",
                    format!(
                        "token {text:?} appears twice in the vocabulary (ids {first} and {id})"
                    ),
                ));
            }
            texts.push(text);
        }
        Ok(Vocab {
            texts,
            scores,
            attrs,
            ids,
        })
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Control, user-defined and unknown tokens, longest text first: the order in which
    /// llama.cpp searches input text for them. (Its unstable sort leaves ties in no set order;
    /// ids break them here.)
    pub fn special_search_order(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = (0u32..)
            .zip(&self.attrs)
            .filter(|(_, attr)| attr.intersects(Attr::CONTROL | Attr::USER_DEFINED | Attr::UNKNOWN))
            .map(|(id, _)| id)
            .collect();
        ids.sort_by_key(|&id| std::cmp::Reverse(self.texts[id as usize].len()));
        ids
    }

    /// The token whose text is `byte` alone (llama.cpp's last resort for a byte no token
    /// covers): only an ASCII byte is a text by itself.
    pub fn single_byte_id(&self, byte: u8) -> Option<u32> {
        if byte.is_ascii() {
            self.id(char::from(byte).encode_utf8(&mut [0; 4]))
        } else {
            None
        }
    }
}

/// An array with one item per token (more are ignored, as llama.cpp does), converted.
fn per_token<T>(
    value: &Value,
    key: &str,
    n_vocab: usize,
    convert: impl Fn(&Value) -> Result<T>,
) -> Result<Vec<T>> {
    let items = value.as_array(key)?;
    if items.len() < n_vocab {
        return Err(Error::malformed(
            "tokenizer",
            format!("{key} has {} entries for {n_vocab} tokens", items.len()),
        ));
    }
    items[..n_vocab].iter().map(convert).collect()
}
