//! Special token ids (BOS, EOS, end of turn, fill-in-the-middle) and the set of tokens that end
//! generation, as llama.cpp's `llama_vocab::impl::load` finds them: file keys over per-model
//! defaults, then tokens recognised by their text where the file names none.

use std::collections::BTreeSet;

use super::vocab::{Attr, Vocab};
use crate::error::Result;
use crate::gguf::GgufFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Bos,
    Eos,
    Eot,
    Eom,
    Unk,
    FimPre,
    FimSuf,
    FimMid,
    FimPad,
    FimRep,
    FimSep,
}

/// The keys read, in llama.cpp's order: the deprecated prefix/suffix/middle keys come last and
/// win over the fim_* ones.
const KEYS: &[(&str, Slot)] = &[
    ("tokenizer.ggml.bos_token_id", Slot::Bos),
    ("tokenizer.ggml.eos_token_id", Slot::Eos),
    ("tokenizer.ggml.eot_token_id", Slot::Eot),
    ("tokenizer.ggml.eom_token_id", Slot::Eom),
    ("tokenizer.ggml.unknown_token_id", Slot::Unk),
    ("tokenizer.ggml.fim_pre_token_id", Slot::FimPre),
    ("tokenizer.ggml.fim_suf_token_id", Slot::FimSuf),
    ("tokenizer.ggml.fim_mid_token_id", Slot::FimMid),
    ("tokenizer.ggml.fim_pad_token_id", Slot::FimPad),
    ("tokenizer.ggml.fim_rep_token_id", Slot::FimRep),
    ("tokenizer.ggml.fim_sep_token_id", Slot::FimSep),
    ("tokenizer.ggml.prefix_token_id", Slot::FimPre),
    ("tokenizer.ggml.suffix_token_id", Slot::FimSuf),
    ("tokenizer.ggml.middle_token_id", Slot::FimMid),
];

/// Texts that name a slot the file leaves empty (llama.cpp's "auto-detect special tokens by
/// text", for converters that do not write these keys).
const TEXTS: &[(Slot, &[&str])] = &[
    (
        Slot::Eot,
        &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "<｜end▁of▁sentence｜>",
            "<end_of_utterance>",
        ],
    ),
    (Slot::Eom, &["<|eom_id|>"]),
    (
        Slot::FimPre,
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
    ),
    (
        Slot::FimSuf,
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
    ),
    (
        Slot::FimMid,
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
    ),
    (
        Slot::FimPad,
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    ),
    (
        Slot::FimRep,
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
    ),
    (Slot::FimSep, &["<|file_sep|>"]),
];

/// Texts of tokens that end generation, whatever the file says.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// gpt-oss (harmony) tokens llama.cpp always renders: made user-defined.
const RENDERED_TEXTS: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// The special ids of a vocabulary.
#[derive(Debug, Default)]
pub(super) struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
    /// Tokens that end generation.
    pub end_of_generation: BTreeSet<u32>,
}

impl SpecialTokens {
    fn slot(&mut self, slot: Slot) -> &mut Option<u32> {
        match slot {
            Slot::Bos => &mut self.bos,
            Slot::Eos => &mut self.eos,
            Slot::Eot => &mut self.eot,
            Slot::Eom => &mut self.eom,
            Slot::Unk => &mut self.unk,
            Slot::FimPre => &mut self.fim_pre,
            Slot::FimSuf => &mut self.fim_suf,
            Slot::FimMid => &mut self.fim_mid,
            Slot::FimPad => &mut self.fim_pad,
            Slot::FimRep => &mut self.fim_rep,
            Slot::FimSep => &mut self.fim_sep,
        }
    }

    /// A tokenizer model's default ids, before the file is read.
    pub fn defaults(bos: Option<u32>, eos: Option<u32>, unk: Option<u32>) -> SpecialTokens {
        SpecialTokens {
            bos,
            eos,
            unk,
            ..SpecialTokens::default()
        }
    }

    /// Reads the ids over the defaults and finds the rest by text, marking the tokens found as
    /// control tokens as llama.cpp does (so that they render only on request).
    pub fn load(self, file: &GgufFile, vocab: &mut Vocab) -> Result<SpecialTokens> {
        let mut special = self;
        let n_vocab = vocab.len();
        let in_vocab = |id: i64| u32::try_from(id).ok().filter(|&id| (id as usize) < n_vocab);
        for &(key, slot) in KEYS {
            let id = special.slot(slot);
            // A default outside a small vocabulary is dropped; a bad id in the file keeps the
            // default (llama.cpp warns about both).
            *id = id.and_then(|id| in_vocab(i64::from(id)));
            if let Some(value) = file.get(key) {
                if let Some(new_id) = in_vocab(value.to_i64(key)?) {
                    *id = Some(new_id);
                }
            }
        }

        for &(slot, texts) in TEXTS {
            // llama.cpp takes the first match in hash order; the lowest id is deterministic.
            let found = texts.iter().filter_map(|text| vocab.id(text)).min();
            if let (None, Some(id)) = (*special.slot(slot), found) {
                *special.slot(slot) = Some(id);
                mark_control(vocab, id);
            }
        }

        let fim_ends = [special.fim_pad, special.fim_rep, special.fim_sep];
        special
            .end_of_generation
            .extend(fim_ends.into_iter().flatten());
        for text in END_OF_GENERATION_TEXTS {
            if let Some(id) = vocab.id(text) {
                special.end_of_generation.insert(id);
                mark_control(vocab, id);
            }
        }
        for text in RENDERED_TEXTS {
            if let Some(id) = vocab.id(text) {
                vocab.attrs[id as usize] = Attr::USER_DEFINED;
            }
        }
        let ends = [special.eos, special.eot, special.eom];
        special.end_of_generation.extend(ends.into_iter().flatten());
        special.apply_end_of_generation_fixes(vocab);
        Ok(special)
    }

    /// llama.cpp's exceptions: with harmony's `<|return|>`/`<|call|>` (or solar-open's
    /// `<|calls|>`/`<|flush|>`), `<|end|>` ends a message, not generation; with gemma 4's
    /// `<|tool_response>`, `</s>` is an ordinary token.
    fn apply_end_of_generation_fixes(&mut self, vocab: &mut Vocab) {
        let ending = |text: &str| {
            vocab
                .id(text)
                .filter(|id| self.end_of_generation.contains(id))
        };
        let call = ending("<|call|>").or(ending("<|calls|>")).is_some();
        let harmony = call && (ending("<|return|>").is_some() || ending("<|flush|>").is_some());
        let end = ending("<|end|>").filter(|_| harmony);
        let s = ending("</s>").filter(|_| ending("<|tool_response>").is_some());
        if let Some(end) = end {
            self.end_of_generation.remove(&end);
            vocab.attrs[end as usize] = Attr::USER_DEFINED;
        }
        if let Some(s) = s {
            self.end_of_generation.remove(&s);
            vocab.attrs[s as usize] = Attr::NORMAL;
        }
    }
}

fn mark_control(vocab: &mut Vocab, id: u32) {
    let attr = &mut vocab.attrs[id as usize];
    *attr = *attr | Attr::CONTROL;
}
