//! Tokenizers built from a GGUF file's vocabulary, reproducing llama.cpp's (`src/llama-vocab.cpp`
//! and `src/unicode.cpp`): SentencePiece BPE with byte fallback (`tokenizer.ggml.model =
//! "llama"`) and byte-level BPE with llama.cpp's pre-tokenizers (`"gpt2"`).
//!
//! Where llama.cpp's choices are arbitrary they are kept, since token ids depend on them; the
//! few places where lugh differs say so (`decode`'s leading space, unknown pre-tokenizers,
//! ties between equally long special tokens).

mod bpe;
mod byte_level;
mod chat;
mod decode;
mod merge;
mod partition;
mod pretokenize;
mod special;
mod spm;
mod unicode;
mod vocab;

pub use chat::{ChatTemplate, CHAT_TEMPLATE};

use bpe::Bpe;
use decode::Spelling;
use partition::Fragment;
use special::SpecialTokens;
use spm::Spm;
use vocab::{Attr, Vocab};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

#[derive(Debug)]
enum Model {
    Spm(Spm),
    Bpe(Bpe),
}

/// A tokenizer: text to token ids and back, exactly as llama.cpp does for the same GGUF file.
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    special: SpecialTokens,
    /// `encode` with `add_special` starts with BOS / ends with EOS.
    add_bos: bool,
    add_eos: bool,
    /// SentencePiece's dummy prefix: text at the start or after a special token is tokenized
    /// with a leading space, which detokenizing takes off the first token again.
    add_space_prefix: bool,
    /// Detokenizing drops spaces before punctuation and some contractions (Hugging Face's
    /// `clean_up_tokenization_spaces`).
    clean_spaces: bool,
    /// Control, user-defined and unknown tokens, longest text first: the order in which input
    /// text is searched for them.
    special_search_order: Vec<u32>,
    /// Each token's bytes with special tokens rendered (llama.cpp's `cache_token_to_piece`).
    pieces: Vec<Vec<u8>>,
    /// `tokenizer.chat_template`, if the file has one.
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let model = match self.model {
            Model::Spm(_) => "llama (SentencePiece)",
            Model::Bpe(_) => "gpt2 (byte-level BPE)",
        };
        f.debug_struct("Tokenizer")
            .field("model", &model)
            .field("n_vocab", &self.n_vocab())
            .field("bos", &self.special.bos)
            .field("eos", &self.special.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer `file`'s `tokenizer.ggml.*` metadata describes, with llama.cpp's
    /// defaults for what it leaves out. `tokenizer.ggml.pre` must be a pre-tokenizer lugh knows
    /// (an absent one is llama.cpp's "default"; an unknown one is an error, as in llama.cpp).
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let model = file.require(MODEL)?.as_str(MODEL)?;
        // llama.cpp's defaults per model: special ids, then the flags.
        let (defaults, pre_config, spelling) = match model {
            "llama" => (
                SpecialTokens::defaults(Some(1), Some(2), Some(0)),
                None,
                Spelling::Spm,
            ),
            "gpt2" => {
                let pre = file.get_str(PRE)?;
                let config = pretokenize::config_for(pre).ok_or_else(|| Error::Unsupported {
                    what: "pre-tokenizer",
                    feature: pre.unwrap_or_default().to_string(),
                    hint: "lugh knows llama.cpp's common pre-tokenizers (src/tokenizer/pretokenize.rs)",
                })?;
                let bos = Some(11).filter(|_| config.has_default_bos);
                let defaults = SpecialTokens::defaults(bos, Some(11), None);
                (defaults, Some(config), Spelling::ByteLevel)
            }
            other => return Err(Error::Unsupported {
                what: "tokenizer model",
                feature: other.to_string(),
                hint: "lugh reads 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) vocabularies",
            }),
        };
        let add_space_prefix = bool_key(file, ADD_SPACE_PREFIX)?.unwrap_or(pre_config.is_none());
        let clean_spaces = pre_config.is_some_and(|config| config.clean_spaces);
        let add_bos =
            bool_key(file, ADD_BOS)?.unwrap_or(pre_config.is_none_or(|config| config.add_bos));
        let add_eos = bool_key(file, ADD_EOS)?.unwrap_or(false);

        let mut vocab = Vocab::from_gguf(file)?;
        let special = defaults.load(file, &mut vocab)?;
        for (adds, id, add_key, id_key) in [
            (add_bos, special.bos, ADD_BOS, "tokenizer.ggml.bos_token_id"),
            (add_eos, special.eos, ADD_EOS, "tokenizer.ggml.eos_token_id"),
        ] {
            if adds && id.is_none() {
                return Err(Error::malformed(
                    "tokenizer",
                    format!("{add_key} is true, but {id_key} is not set"),
                ));
            }
        }
        let model = match pre_config {
            None => Model::Spm(Spm::new(&vocab, special.unk)),
            Some(config) => Model::Bpe(Bpe::new(file, &config)?),
        };

        let special_search_order = vocab.special_search_order();
        let pieces = (0u32..)
            .zip(vocab.texts.iter().zip(&vocab.attrs))
            .map(|(id, (text, &attr))| decode::piece(id, text, attr, spelling))
            .collect::<Result<_>>()?;

        Ok(Tokenizer {
            vocab,
            model,
            special,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            special_search_order,
            pieces,
            chat_template: file.get_str(CHAT_TEMPLATE)?.map(str::to_string),
        })
    }

    /// The chat template of the file, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// `messages` (a JSON list of `{"role": ..., "content": ...}`) as prompt text, rendered by
    /// `template` or else the file's own, with `extra` template variables (`tools`, ...).
    pub fn apply_chat_template(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        template: Option<&str>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let source = template.or(self.chat_template()).ok_or_else(|| {
            Error::invalid(
                "template",
                "this model's GGUF has no tokenizer.chat_template: pass the template to use",
            )
        })?;
        let text = |id: Option<u32>| {
            id.and_then(|id| self.vocab.texts.get(id as usize))
                .cloned()
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            source.to_string(),
            text(self.special.bos),
            text(self.special.eos),
        );
        template.render(messages, add_generation_prompt, extra)
    }

    /// The text `template` (or the file's own) closes an assistant turn with ("<|im_end|>",
    /// "<|eot_id|>", "<|end|>"): a model whose vocabulary lacks it as a token still spells
    /// it, and a reply ends there. None when the template puts nothing after the reply.
    pub fn end_of_turn(&self, template: Option<&str>) -> Result<Option<String>> {
        const MARKER: &str = "\u{2063}lugh\u{2063}";
        let messages = serde_json::json!([
            {"role": "user", "content": "?"},
            {"role": "assistant", "content": MARKER},
        ]);
        let text = self.apply_chat_template(&messages, false, template, &Default::default())?;
        Ok(text
            .rsplit_once(MARKER)
            .and_then(|(_, closing)| closing.split_whitespace().next())
            .map(str::to_string))
    }

    /// The token ids of `text`. `add_special` adds BOS and/or EOS as the vocabulary asks
    /// (`tokenizer.ggml.add_bos_token` / `add_eos_token`); `parse_special` turns the texts of
    /// control tokens in `text` (e.g. "<s>", "<|eot_id|>") into those tokens, where otherwise
    /// they are tokenized as plain text. User-defined tokens are always recognised.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let specials = self
            .special_search_order
            .iter()
            .filter(|&&id| {
                parse_special
                    || !self.vocab.attrs[id as usize].intersects(Attr::CONTROL | Attr::UNKNOWN)
            })
            .map(|&id| (id, self.vocab.texts[id as usize].as_str()));
        let fragments = partition::partition(text, specials);

        let mut ids = Vec::new();
        if add_special && self.add_bos {
            ids.extend(self.special.bos);
        }
        match &self.model {
            Model::Spm(spm) => {
                let mut after_special = true;
                let mut escaped = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(text) => {
                            escaped.clear();
                            if self.add_space_prefix && after_special {
                                escaped.push('▁');
                            }
                            escaped.extend(text.chars().map(|c| if c == ' ' { '▁' } else { c }));
                            spm.tokenize(&self.vocab, &escaped, &mut ids);
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            ids.push(id);
                            after_special = true;
                        }
                    }
                }
            }
            Model::Bpe(bpe) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(text) => bpe.tokenize(&self.vocab, text, &mut ids),
                        Fragment::Token(id) => ids.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            ids.extend(self.special.eos);
        }
        ids
    }

    /// The text of `ids`, such that `decode(encode(text, add_special, false))` is `text` (but
    /// for the spaces the vocabulary's clean-up removes, see `detokenize`). It is `detokenize(ids,
    /// true, false)` read as UTF-8 (invalid sequences, e.g. a character cut in two, become
    /// U+FFFD), except that the SentencePiece prefix space is also removed after a leading BOS,
    /// where llama.cpp keeps it (as llama-cpp-python and Hugging Face remove it).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes = self.render(ids, true, false, true)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// llama.cpp's `llama_detokenize`: the bytes of `ids`. `remove_special` drops a leading BOS
    /// and a trailing EOS where the vocabulary adds them; `unparse_special` renders control
    /// tokens as their text (otherwise they are empty). The first token loses one leading
    /// space where the vocabulary adds a prefix space, unless a dropped BOS came before it;
    /// byte-level vocabularies with `clean_spaces` then drop spaces before "?!.," and some
    /// contractions.
    pub fn detokenize(
        &self,
        ids: &[u32],
        remove_special: bool,
        unparse_special: bool,
    ) -> Result<Vec<u8>> {
        self.render(ids, remove_special, unparse_special, false)
    }

    fn render(
        &self,
        mut ids: &[u32],
        remove_special: bool,
        unparse_special: bool,
        remove_space_after_bos: bool,
    ) -> Result<Vec<u8>> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.n_vocab()) {
            return Err(self.out_of_range(bad));
        }
        let mut remove_space = self.add_space_prefix;
        if remove_special && self.add_bos {
            if let [first, rest @ ..] = ids {
                if Some(*first) == self.special.bos {
                    remove_space = remove_space && remove_space_after_bos;
                    ids = rest;
                }
            }
        }
        if remove_special && self.add_eos {
            if let [rest @ .., last] = ids {
                if Some(*last) == self.special.eos {
                    ids = rest;
                }
            }
        }
        let mut text = Vec::new();
        for &id in ids {
            let piece = self.token_to_piece(id, unparse_special)?;
            let piece = match piece {
                [b' ', rest @ ..] if remove_space => rest,
                _ => piece,
            };
            remove_space = false;
            text.extend_from_slice(piece);
        }
        if self.clean_spaces {
            decode::clean_up_spaces(&mut text);
        }
        Ok(text)
    }

    /// The bytes of one token (llama.cpp's `token_to_piece`): SentencePiece '▁' as a space,
    /// byte tokens as their byte, byte-level BPE text as the bytes it spells. Control and
    /// unknown tokens are empty unless `special`. Bytes, since a token may hold part of a
    /// character.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Result<&[u8]> {
        let index = id as usize;
        let attr = *self
            .vocab
            .attrs
            .get(index)
            .ok_or_else(|| self.out_of_range(id))?;
        if !special && attr.intersects(Attr::UNKNOWN | Attr::CONTROL) {
            return Ok(&[]);
        }
        Ok(&self.pieces[index])
    }

    /// The beginning-of-sequence token, if the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }

    /// The end-of-sequence token, if the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.len()
    }

    /// Whether `id` ends generation: EOS, end of turn / message, and the tokens llama.cpp
    /// recognises by their text (`<|im_end|>`, `<end_of_turn>`, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.special.end_of_generation.contains(&id)
    }

    /// Every token that ends generation (see `is_eog`).
    pub fn end_of_generation(&self) -> impl Iterator<Item = u32> + '_ {
        self.special.end_of_generation.iter().copied()
    }

    fn out_of_range(&self, id: u32) -> Error {
        Error::TokenOutOfRange {
            token: i64::from(id),
            n_vocab: self.n_vocab(),
        }
    }
}

fn bool_key(file: &GgufFile, key: &str) -> Result<Option<bool>> {
    file.get(key).map(|value| value.to_bool(key)).transpose()
}

#[cfg(test)]
mod tests;
