//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`), as llama.cpp's `llm_tokenizer_bpe_session`:
//! the pre-tokenizer splits text into words, each word is spelled in GPT-2's byte alphabet, and
//! within a word adjacent runs merge by the rank of their pair in `tokenizer.ggml.merges`
//! (earliest first).

use std::cmp::Reverse;
use std::collections::HashMap;

use super::byte_level;
use super::merge::{merge, Pair};
use super::pretokenize::{PreConfig, PreTokenizer};
use super::vocab::Vocab;
use crate::error::Result;
use crate::gguf::GgufFile;

const MERGES: &str = "tokenizer.ggml.merges";

#[derive(Debug)]
pub(super) struct Bpe {
    /// The rank of each merge, keyed by its text "left right" as the file writes it. Runs of a
    /// byte-level word never contain ' ' (a space is 'Ġ'), so the key is unambiguous.
    ranks: HashMap<String, u32>,
    pre: PreTokenizer,
    /// A word that is a token as a whole becomes that token unmerged (LLaMA 3).
    ignore_merges: bool,
}

impl Bpe {
    pub fn new(file: &GgufFile, config: &PreConfig) -> Result<Bpe> {
        let merges = file.require(MERGES)?.as_array(MERGES)?;
        let mut ranks = HashMap::with_capacity(merges.len());
        for (rank, merge) in (0u32..).zip(merges) {
            let merge = merge.as_str(MERGES)?;
            // llama.cpp splits at the first space after the first byte; a line without one can
            // never apply. A repeated line keeps its first rank.
            if merge.bytes().skip(1).any(|b| b == b' ') {
                ranks.entry(merge.to_string()).or_insert(rank);
            }
        }
        Ok(Bpe {
            ranks,
            pre: PreTokenizer::new(config.regexes),
            ignore_merges: config.ignore_merges,
        })
    }

    /// Appends the tokens of `text`.
    pub fn tokenize(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut word = String::new();
        let mut key = String::new();
        for piece in self.pre.split(text) {
            word.clear();
            byte_level::encode_into(piece, &mut word);
            if self.ignore_merges {
                if let Some(id) = vocab.id(&word) {
                    out.push(id);
                    continue;
                }
            }
            let rank = |pair: Pair| {
                key.clear();
                key.push_str(pair.left);
                key.push(' ');
                key.push_str(pair.right);
                // The earliest merge is the best.
                self.ranks.get(&key).map(|&rank| Reverse(rank))
            };
            for run in merge(&word, rank) {
                match vocab.id(run) {
                    Some(id) => out.push(id),
                    None => out.extend(run.bytes().filter_map(|b| vocab.single_byte_id(b))),
                }
            }
        }
    }
}
