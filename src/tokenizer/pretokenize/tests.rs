//! Pinned splits, and the hand-written splitters against the regexes they stand for.

use super::*;

fn split(regexes: &[&str], text: &str) -> Vec<String> {
    PreTokenizer::new(regexes)
        .split(text)
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// The same pattern run by the regex engine rather than a hand-written splitter.
fn split_by_regex(pattern: &str, text: &str) -> Vec<String> {
    let pre = PreTokenizer {
        splitters: vec![Splitter::regex(pattern)],
    };
    pre.split(text).into_iter().map(str::to_string).collect()
}

const SAMPLES: &[&str] = &[
    "Hello world",
    " Hello  world   ",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "3 33 333 3333 33333 333333 3.3 3..3 3...3 ½²",
    "🚀 (normal) 😶\u{200d}🌫️ (multiple emojis) ✅ 🦙🦙",
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български",
    "'''''''```````\"\"\"\"......!!!!!!??????",
    "Cửa Việt e\u{301} x\u{a0}y z\u{3000}\u{3000}w\r\n\r\n end ' ",
    "",
    " ",
    "a ",
    "'",
];

#[test]
fn hand_written_splitters_agree_with_their_regexes() {
    for text in SAMPLES {
        assert_eq!(
            split(&[GPT2], text),
            split_by_regex(GPT2, text),
            "GPT-2 on {text:?}"
        );
        assert_eq!(
            split(&[LLAMA3], text),
            split_by_regex(LLAMA3, text),
            "LLaMA 3 on {text:?}"
        );
    }
}

#[test]
fn llama3_splits() {
    assert_eq!(
        split(&[LLAMA3], "Hello, y'all!  How  \n\n 3333 'RE"),
        ["Hello", ",", " y", "'all", "!", " ", " How", "  \n\n", " ", "333", "3", " '", "RE"]
    );
}

#[test]
fn gpt2_splits() {
    assert_eq!(
        split(&[GPT2], "Hello, y'all!  How  \n\n 3333 'RE"),
        ["Hello", ",", " y", "'", "all", "!", " ", " How", "  \n\n", " 3333", " '", "RE"]
    );
}

#[test]
fn default_splits_punctuation_runs_and_digits_in_threes() {
    // The first regex takes punctuation runs, the third digit runs, the fourth threes of them.
    assert_eq!(
        split(DEFAULT_REGEXES, "a...b 12345 x~y"),
        ["a", "...", "b", " ", "123", "45", " x", "~", "y"]
    );
}

#[test]
fn qwen2_takes_one_digit_at_a_time() {
    assert_eq!(split(&[QWEN2], "ab 123"), ["ab", " ", "1", "2", "3"]);
}

#[test]
fn every_known_pre_tokenizer_compiles_and_covers_its_text() {
    for (names, config) in PRE_TOKENIZERS {
        let pre = PreTokenizer::new(config.regexes);
        for text in SAMPLES {
            assert_eq!(pre.split(text).concat(), *text, "{names:?} on {text:?}");
        }
    }
}

#[test]
fn patterns_with_categories_are_ascii() {
    // llama.cpp refuses others; `collapse_pattern` relies on it.
    for (_, config) in PRE_TOKENIZERS {
        for pattern in config.regexes {
            assert!(!uses_categories(pattern) || pattern.is_ascii(), "{pattern}");
        }
    }
}

#[test]
fn collapsing_rewrites_categories_as_classes() {
    assert_eq!(collapse_pattern(r"\p{N}+"), r"[\x{D1}0-9]+");
    assert_eq!(
        collapse_pattern(r" ?[^\s\p{L}\p{N}]+"),
        r" ?[^\s\x{D2}A-Za-z\x{D1}0-9]+"
    );
    assert_eq!(collapse_pattern(r"\[\p{M}\]"), r"\[[\x{D4}]\]");
}

#[test]
fn config_names() {
    assert!(config_for(None).is_some_and(|c| c.regexes == DEFAULT_REGEXES));
    assert!(config_for(Some("")).is_some_and(|c| c.regexes == DEFAULT_REGEXES));
    assert!(config_for(Some("llama-bpe")).is_some_and(|c| c.ignore_merges && c.add_bos));
    assert!(config_for(Some("qwen2")).is_some_and(|c| !c.clean_spaces));
    assert!(config_for(Some("chatglm-bpe")).is_some_and(|c| !c.has_default_bos));
    assert!(config_for(Some("no-such-pre")).is_none());
}
