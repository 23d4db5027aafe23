//! SentencePiece BPE with byte fallback (`tokenizer.ggml.model = "llama"`), as llama.cpp's
//! `llm_tokenizer_spm_session`: adjacent runs merge while their concatenation is a token, the
//! highest-scoring token first; runs no token covers become byte tokens `<0xNN>`.

use std::cmp::Ordering;

use super::merge::merge;
use super::vocab::Vocab;

/// The byte fallback of a vocabulary.
#[derive(Debug)]
pub(super) struct Spm {
    /// The token of each byte: `<0xNN>`, else the byte as a one-character token (llama.cpp's
    /// `byte_to_token`), else (where llama.cpp throws) the unknown token, as SentencePiece
    /// without byte fallback does. A byte with none of these is dropped.
    byte_tokens: Box<[Option<u32>; 256]>,
}

impl Spm {
    pub fn new(vocab: &Vocab, unk: Option<u32>) -> Spm {
        let mut byte_tokens = Box::new([None; 256]);
        for (byte, token) in (0..=255u8).zip(byte_tokens.iter_mut()) {
            *token = vocab
                .id(&format!("<0x{byte:02X}>"))
                .or_else(|| vocab.single_byte_id(byte))
                .or(unk);
        }
        Spm { byte_tokens }
    }

    /// Appends the tokens of `text`, whose spaces are already '▁'.
    pub fn tokenize(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let score = |merged: &str| vocab.id(merged).map(|id| Score(vocab.scores[id as usize]));
        for run in merge(text, |pair| score(pair.merged)) {
            match vocab.id(run) {
                Some(id) => out.push(id),
                None => out.extend(run.bytes().filter_map(|b| self.byte_tokens[usize::from(b)])),
            }
        }
    }
}

/// A token score, ordered totally so it can rank merges (scores are finite log-probabilities).
#[derive(Debug, Clone, Copy)]
struct Score(f32);

impl Ord for Score {
    fn cmp(&self, other: &Score) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Score) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Score {
    fn eq(&self, other: &Score) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Score {}
