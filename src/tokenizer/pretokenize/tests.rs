//! Pinned splits, and the hand-written splitters against the regexes they stand for.

use super::*;

fn split(regexes: &[&str], text: &str) -> Vec<String> {
    PreTokenizer::new(regexes)
        .split(text)
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// The hand-written splitters, and the same patterns run by the regex engine.
fn splitter_pairs() -> [(&'static str, PreTokenizer, PreTokenizer); 2] {
    let by_regex = |pattern| PreTokenizer {
        splitters: vec![Splitter::regex(pattern)],
    };
    [
        ("GPT-2", PreTokenizer::new(&[GPT2]), by_regex(GPT2)),
        ("LLaMA 3", PreTokenizer::new(&[LLAMA3]), by_regex(LLAMA3)),
    ]
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
    for (name, hand_written, regex) in splitter_pairs() {
        for text in SAMPLES {
            assert_eq!(
                hand_written.split(text),
                regex.split(text),
                "{name} on {text:?}"
            );
        }
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

#[test]
fn hand_written_splitters_agree_with_their_regexes_on_random_text() {
    use rand::{Rng, SeedableRng};
    // Characters of every class the splitters distinguish, ASCII and not.
    let alphabet: Vec<char> =
        "aZ09 \t\n\r'sStTrReEvVlLmMdD.,!?-_~$+<=>|`/(\u{a0}\u{3000}\u{85}é語½\u{301}\u{200d}🙂€٣"
            .chars()
            .collect();
    let pairs = splitter_pairs();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..20_000 {
        let len = rng.random_range(0..24);
        let text: String = (0..len)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        for (name, hand_written, regex) in &pairs {
            assert_eq!(
                hand_written.split(&text),
                regex.split(&text),
                "{name} on {text:?}"
            );
        }
    }
}
