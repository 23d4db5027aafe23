//! Pre-tokenizers of byte-level BPE vocabularies: the regexes llama.cpp's `llm_tokenizer_bpe`
//! uses for each `tokenizer.ggml.pre` value, applied as its `unicode_regex_split` does.
//!
//! A pre-tokenizer is a list of regexes applied in turn: each splits every piece the previous
//! ones left into its matches and the gaps between them (a gap is kept as a piece too). Three
//! details decide the result as much as the regexes do, and are reproduced here:
//! - the GPT-2 and LLaMA-3 regexes run as hand-written splitters (`split_gpt2`,
//!   `split_llama3`), whose edge cases are llama.cpp's, not a regex engine's;
//! - other regexes using `\p{..}` run on a "collapsed" text in which every non-ASCII codepoint
//!   becomes one stand-in per class (so `\p{L}` is "ASCII letters or the letter stand-in");
//! - regexes without `\p{..}` run on the codepoints with non-ASCII whitespace turned into '\x0B'
//!   (C++ `std::wregex` has no Unicode `\s`).

use fancy_regex::{Regex, RegexBuilder};

use super::unicode::{Class, Flags};

// The regexes, as llama.cpp writes them (it rewrites Hugging Face's `(?i:..)` groups, which
// C++ regexes lack, as explicit case classes).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK3: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const CJK_HANGUL: &str = "[一-龥ࠀ-一가-퟿]+";
const DIGIT: &str = r"\p{N}";
const THREE_DIGITS: &str = "[0-9][0-9][0-9]";

const DEFAULT_REGEXES: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", THREE_DIGITS];
const FALCON_REGEXES: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, THREE_DIGITS];
const STARCODER_REGEXES: &[&str] = &[DIGIT, GPT2];
const DEEPSEEK_LLM_REGEXES: &[&str] = &[
    "[\r\n]",
    // Cased letters. Codepoints that Unicode normalization would replace (U+1F7D, U+1FBE,
    // U+1FD3, U+1FDB, U+2126, U+212A) are escaped so that no editor can change them.
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    CJK_HANGUL,
    r"\p{N}+",
];
const DEEPSEEK_CODER_REGEXES: &[&str] = &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_HANGUL, DIGIT];
const DEEPSEEK3_REGEXES: &[&str] = &[r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3];

/// How llama.cpp sets up a byte-level BPE vocabulary for one `tokenizer.ggml.pre` value.
#[derive(Debug, Clone, Copy)]
pub(super) struct PreConfig {
    pub regexes: &'static [&'static str],
    /// Detokenizing removes the spaces Hugging Face's `clean_up_tokenization_spaces` removes.
    pub clean_spaces: bool,
    /// A pre-tokenized word that is a token as a whole is not merged (LLaMA 3).
    pub ignore_merges: bool,
    /// The default for `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// False where llama.cpp drops the default BOS id (ChatGLM).
    pub has_default_bos: bool,
}

const fn pre(regexes: &'static [&'static str], clean_spaces: bool) -> PreConfig {
    PreConfig {
        regexes,
        clean_spaces,
        ignore_merges: false,
        add_bos: false,
        has_default_bos: true,
    }
}

impl PreConfig {
    const fn ignoring_merges_adding_bos(self) -> PreConfig {
        PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..self
        }
    }

    const fn without_default_bos(self) -> PreConfig {
        PreConfig {
            has_default_bos: false,
            ..self
        }
    }
}

/// llama.cpp's `tokenizer.ggml.pre` names (src/llama-vocab.cpp, `load`), those lugh knows.
const PRE_TOKENIZERS: &[(&[&str], PreConfig)] = &[
    (&["default"], pre(DEFAULT_REGEXES, true)),
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        pre(&[LLAMA3], true).ignoring_merges_adding_bos(),
    ),
    (&["dbrx", "smaug-bpe"], pre(&[LLAMA3], true)),
    (
        &["glm4", "chatglm-bpe"],
        pre(&[LLAMA3], true).without_default_bos(),
    ),
    (&["deepseek-llm"], pre(DEEPSEEK_LLM_REGEXES, false)),
    (&["deepseek-coder"], pre(DEEPSEEK_CODER_REGEXES, false)),
    (&["deepseek-v3"], pre(DEEPSEEK3_REGEXES, false)),
    (&["falcon"], pre(FALCON_REGEXES, true)),
    (
        &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "exaone4",
            "mpt",
            "olmo",
            "jais",
        ],
        pre(&[GPT2], true),
    ),
    (&["trillion", "granite-docling"], pre(&[GPT2], false)),
    (
        &[
            "starcoder",
            "refact",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        pre(STARCODER_REGEXES, true),
    ),
    (&["command-r", "smollm"], pre(STARCODER_REGEXES, false)),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ],
        pre(&[QWEN2], false),
    ),
    (&["stablelm2", "megrez"], pre(&[QWEN2], true)),
    (&["qwen35"], pre(&[QWEN35], false)),
    (&["seed-coder"], pre(&[SEED_CODER], false)),
    (
        &["bailingmoe", "bailingmoe2", "llada-moe"],
        pre(&[BAILINGMOE], false),
    ),
    (&["poro-chat"], pre(&[PORO], false)),
    (&["bloom", "gpt3-finnish"], pre(&[PORO], true)),
    (&["viking"], pre(&[PORO, DIGIT], false)),
    (
        &["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
        pre(&[GPT4O], false),
    ),
    (
        &["tekken"],
        pre(&[TEKKEN], false).ignoring_merges_adding_bos(),
    ),
];

/// The configuration for a `tokenizer.ggml.pre` value: `None` (absent or empty) is llama.cpp's
/// "default" (which it warns about); an unknown name is `None` too, for the caller to refuse.
pub(super) fn config_for(name: Option<&str>) -> Option<PreConfig> {
    let name = match name {
        None | Some("") => "default",
        Some(name) => name,
    };
    PRE_TOKENIZERS
        .iter()
        .find(|(names, _)| names.contains(&name))
        .map(|&(_, config)| config)
}

/// One regex of a pre-tokenizer, as llama.cpp runs it.
#[derive(Debug)]
enum Splitter {
    Gpt2,
    Llama3,
    /// A regex over the collapsed text (it uses `\p{..}`) or over the codepoints.
    Regex {
        regex: Regex,
        collapsed: bool,
    },
}

/// The patterns backtrack little (their look-arounds test one character), so the limit only
/// guards against pathological input; reaching it leaves the rest of that piece whole.
const BACKTRACK_LIMIT: usize = 100_000_000;

impl Splitter {
    /// llama.cpp picks its hand-written splitters by comparing the pattern text.
    fn new(pattern: &str) -> Splitter {
        match pattern {
            GPT2 => Splitter::Gpt2,
            LLAMA3 => Splitter::Llama3,
            _ => Splitter::regex(pattern),
        }
    }

    fn regex(pattern: &str) -> Splitter {
        let collapsed = uses_categories(pattern);
        let source = if collapsed {
            collapse_pattern(pattern)
        } else {
            pattern.to_string()
        };
        let regex = RegexBuilder::new(&source)
            .backtrack_limit(BACKTRACK_LIMIT)
            .build()
            .expect("the pre-tokenizer table's regexes compile (tested)");
        Splitter::Regex { regex, collapsed }
    }
}

/// A pre-tokenizer: splits text into the words that BPE merges within.
#[derive(Debug)]
pub(super) struct PreTokenizer {
    splitters: Vec<Splitter>,
}

impl PreTokenizer {
    pub(super) fn new(regexes: &[&str]) -> PreTokenizer {
        PreTokenizer {
            splitters: regexes
                .iter()
                .map(|pattern| Splitter::new(pattern))
                .collect(),
        }
    }

    /// The words of `text`, in order; together they are `text`.
    pub(super) fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let codepoints = Codepoints::new(text);
        let mut collapsed = None;
        let mut wide = None;
        // Pieces as codepoint counts, like llama.cpp's offsets.
        let mut pieces = vec![codepoints.chars.len()];
        for splitter in &self.splitters {
            let mut next = Vec::with_capacity(pieces.len());
            let mut start = 0;
            for &len in &pieces {
                let range = start..start + len;
                match splitter {
                    Splitter::Gpt2 => split_gpt2(&codepoints.piece(range), &mut next),
                    Splitter::Llama3 => split_llama3(&codepoints.piece(range), &mut next),
                    Splitter::Regex {
                        regex,
                        collapsed: true,
                    } => {
                        let haystack = collapsed.get_or_insert_with(|| codepoints.collapsed());
                        haystack.split(regex, range, &mut next);
                    }
                    Splitter::Regex {
                        regex,
                        collapsed: false,
                    } => {
                        let haystack = wide.get_or_insert_with(|| codepoints.wide());
                        haystack.split(regex, range, &mut next);
                    }
                }
                start += len;
            }
            pieces = next;
        }
        let mut start = 0;
        pieces
            .iter()
            .map(|&len| {
                let word =
                    &text[codepoints.byte_offsets[start]..codepoints.byte_offsets[start + len]];
                start += len;
                word
            })
            .collect()
    }
}

/// The text as codepoints, with what the splitters ask of each.
struct Codepoints {
    chars: Vec<char>,
    flags: Vec<Flags>,
    /// Byte offset of each codepoint in the text, and the text's length last.
    byte_offsets: Vec<usize>,
}

impl Codepoints {
    fn new(text: &str) -> Codepoints {
        let chars: Vec<char> = text.chars().collect();
        let flags = chars.iter().map(|&c| Flags::of(c)).collect();
        let byte_offsets = text
            .char_indices()
            .map(|(offset, _)| offset)
            .chain(std::iter::once(text.len()))
            .collect();
        Codepoints {
            chars,
            flags,
            byte_offsets,
        }
    }

    fn piece(&self, range: std::ops::Range<usize>) -> Piece<'_> {
        Piece {
            chars: &self.chars[range.clone()],
            flags: &self.flags[range],
        }
    }

    /// The text regexes with `\p{..}` run on (llama.cpp's `text_collapsed`).
    fn collapsed(&self) -> Haystack {
        Haystack::new(self.chars.iter().zip(&self.flags).map(|(&c, flags)| {
            if c.is_ascii() {
                c
            } else if flags.is_whitespace {
                WHITESPACE_STAND_IN
            } else {
                stand_in(flags.class)
            }
        }))
    }

    /// The text regexes without `\p{..}` run on.
    fn wide(&self) -> Haystack {
        Haystack::new(self.chars.iter().zip(&self.flags).map(|(&c, flags)| {
            if !c.is_ascii() && flags.is_whitespace {
                WHITESPACE_STAND_IN
            } else {
                c
            }
        }))
    }
}

/// Non-ASCII whitespace becomes '\v', which every regex engine's `\s` matches.
const WHITESPACE_STAND_IN: char = '\x0B';

/// The character standing for a non-ASCII codepoint of `class` in the collapsed text
/// (llama.cpp uses the bytes 0xD0..=0xD5; any characters no pattern names literally will do).
fn stand_in(class: Class) -> char {
    match class {
        Class::Number => '\u{D1}',
        Class::Letter => '\u{D2}',
        Class::Punctuation => '\u{D3}',
        Class::Mark => '\u{D4}',
        Class::Symbol => '\u{D5}',
        Class::Separator | Class::Other => '\u{D0}',
    }
}

/// The categories llama.cpp collapses (`k_ucat_enum`): the letter subclasses all mean `\p{L}`.
const CATEGORIES: [&str; 10] = [
    r"\p{N}", r"\p{L}", r"\p{P}", r"\p{M}", r"\p{S}", r"\p{Lu}", r"\p{Ll}", r"\p{Lt}", r"\p{Lm}",
    r"\p{Lo}",
];

/// What a category becomes in a collapsed regex: its stand-in and its ASCII members
/// (llama.cpp's `k_ucat_map`, whose `\p{S}` lacks '~': kept, since it decides how text splits).
fn category_members(category: &str) -> Option<&'static str> {
    Some(match category {
        r"\p{N}" => r"\x{D1}0-9",
        r"\p{L}" | r"\p{Lu}" | r"\p{Ll}" | r"\p{Lt}" | r"\p{Lm}" | r"\p{Lo}" => r"\x{D2}A-Za-z",
        r"\p{P}" => r"\x{D3}!-#%-*,-/:-;?-@\[-\]_\{\}",
        r"\p{M}" => r"\x{D4}",
        r"\p{S}" => r"\x{D5}\$\+<->\^`\|",
        _ => return None,
    })
}

fn uses_categories(pattern: &str) -> bool {
    CATEGORIES.iter().any(|category| pattern.contains(category))
}

/// Rewrites each `\p{..}` as a class of its stand-in and ASCII members, bracketed unless it is
/// inside brackets already (llama.cpp's `regex_expr_collapsed`, whose bracket tracking this
/// follows: a '[' or ']' preceded by '\' does not open or close a class).
fn collapse_pattern(pattern: &str) -> String {
    let bytes = pattern.as_bytes();
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut inside = false;
    let mut i = 0;
    while i < bytes.len() {
        let escaped = i > 0 && bytes[i - 1] == b'\\';
        match bytes[i] {
            b'[' if !escaped => inside = true,
            b']' if inside && !escaped => inside = false,
            b'\\' if bytes.get(i + 1) == Some(&b'p') && bytes.get(i + 2) == Some(&b'{') => {
                let members = pattern[i..].find('}').and_then(|close| {
                    category_members(&pattern[i..=i + close]).map(|m| (close, m))
                });
                if let Some((close, members)) = members {
                    if !inside {
                        out.push('[');
                    }
                    out.push_str(members);
                    if !inside {
                        out.push(']');
                    }
                    i += close + 1;
                    continue;
                }
            }
            _ => {}
        }
        // Patterns using categories are ASCII (llama.cpp refuses others), so bytes are chars.
        out.push(char::from(bytes[i]));
        i += 1;
    }
    out
}

/// A text a regex runs on: one character per codepoint of the original.
struct Haystack {
    text: String,
    /// Byte offset of each character, and the text's length last.
    byte_offsets: Vec<usize>,
}

impl Haystack {
    fn new(chars: impl Iterator<Item = char>) -> Haystack {
        let mut text = String::new();
        let mut byte_offsets = Vec::new();
        for c in chars {
            byte_offsets.push(text.len());
            text.push(c);
        }
        byte_offsets.push(text.len());
        Haystack { text, byte_offsets }
    }

    /// Splits the codepoints `range` into matches and the gaps between them, appending their
    /// lengths. The regex sees only this piece, as in llama.cpp (look-ahead and `$` stop at
    /// its end).
    fn split(&self, regex: &Regex, range: std::ops::Range<usize>, lens: &mut Vec<usize>) {
        let base = self.byte_offsets[range.start];
        let piece = &self.text[base..self.byte_offsets[range.end]];
        let to_codepoint = |byte: usize| {
            self.byte_offsets[range.start..=range.end]
                .binary_search(&(base + byte))
                .map_or(range.end, |i| range.start + i)
        };
        let mut done = range.start;
        for found in regex.find_iter(piece) {
            let Ok(found) = found else { break };
            let (start, end) = (to_codepoint(found.start()), to_codepoint(found.end()));
            if start > done {
                lens.push(start - done);
            }
            // An empty match splits nothing (llama.cpp records an empty piece, which encodes
            // to no tokens).
            if end > start {
                lens.push(end - start);
            }
            done = end;
        }
        if range.end > done {
            lens.push(range.end - done);
        }
    }
}

/// One piece being split by a hand-written splitter; positions past either end read as
/// nothing, like llama.cpp's `OUT_OF_RANGE`.
struct Piece<'a> {
    chars: &'a [char],
    flags: &'a [Flags],
}

impl Piece<'_> {
    fn len(&self) -> usize {
        self.chars.len()
    }

    fn char(&self, pos: usize) -> Option<char> {
        self.chars.get(pos).copied()
    }

    fn flags(&self, pos: usize) -> Option<Flags> {
        self.flags.get(pos).copied()
    }

    fn is_letter(&self, pos: usize) -> bool {
        self.flags(pos).is_some_and(Flags::is_letter)
    }

    fn is_number(&self, pos: usize) -> bool {
        self.flags(pos).is_some_and(Flags::is_number)
    }

    fn is_whitespace(&self, pos: usize) -> bool {
        self.flags(pos).is_some_and(|f| f.is_whitespace)
    }

    /// `[^\s\p{L}\p{N}]`: a codepoint that is neither whitespace, letter nor number.
    fn is_other(&self, pos: usize) -> bool {
        self.flags(pos)
            .is_some_and(|f| !f.is_whitespace && !f.is_letter() && !f.is_number())
    }

    /// The length of a contraction (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`) at `pos`, if one
    /// starts there. LLaMA 3 ignores case; no non-ASCII codepoint lowercases to these letters,
    /// so ASCII lowercasing is llama.cpp's `unicode_tolower` here.
    fn contraction(&self, pos: usize, ignore_case: bool) -> Option<usize> {
        if self.char(pos) != Some('\'') {
            return None;
        }
        let letter = |p| {
            self.char(p).map(|c| {
                if ignore_case {
                    c.to_ascii_lowercase()
                } else {
                    c
                }
            })
        };
        match letter(pos + 1)? {
            's' | 't' | 'm' | 'd' => Some(2),
            first => match (first, letter(pos + 2)?) {
                ('r', 'e') | ('v', 'e') | ('l', 'l') => Some(3),
                _ => None,
            },
        }
    }

    /// How many whitespace codepoints start at `pos`, and where the last '\r' or '\n' among
    /// them ends.
    fn whitespace_run(&self, pos: usize) -> (usize, Option<usize>) {
        let mut n = 0;
        let mut line_break_end = None;
        while self.is_whitespace(pos + n) {
            if matches!(self.char(pos + n), Some('\r' | '\n')) {
                line_break_end = Some(pos + n + 1);
            }
            n += 1;
        }
        (n, line_break_end)
    }

    /// `\s+(?!\S)|\s+` at `pos` (a whitespace run of `n`): a run followed by more text leaves
    /// its last codepoint to prefix the next word; at the end of the piece it is taken whole.
    fn whitespace_end(&self, pos: usize, n: usize) -> usize {
        if n > 1 && pos + n < self.len() {
            pos + n - 1
        } else if n > 0 {
            pos + n
        } else {
            pos + 1
        }
    }
}

/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)` as llama.cpp's
/// `unicode_regex_split_custom_gpt2` matches it. Appends the word lengths.
fn split_gpt2(piece: &Piece, lens: &mut Vec<usize>) {
    let mut pos = 0;
    while pos < piece.len() {
        let start = pos;
        let after_space = pos + usize::from(piece.char(pos) == Some(' '));
        pos = if let Some(len) = piece.contraction(pos, false) {
            pos + len
        } else if piece.is_letter(after_space) {
            (after_space..)
                .find(|&p| !piece.is_letter(p))
                .unwrap_or(after_space)
        } else if piece.is_number(after_space) {
            (after_space..)
                .find(|&p| !piece.is_number(p))
                .unwrap_or(after_space)
        } else if piece.is_other(after_space) {
            (after_space..)
                .find(|&p| !piece.is_other(p))
                .unwrap_or(after_space)
        } else {
            piece.whitespace_end(pos, piece.whitespace_run(pos).0)
        };
        lens.push(pos - start);
    }
}

/// LLaMA 3's `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+` as llama.cpp's
/// `unicode_regex_split_custom_llama3` matches it. Appends the word lengths.
fn split_llama3(piece: &Piece, lens: &mut Vec<usize>) {
    let mut pos = 0;
    while pos < piece.len() {
        let start = pos;
        let c = piece.char(pos);
        let after_space = pos + usize::from(c == Some(' '));
        if let Some(len) = piece.contraction(pos, true) {
            pos += len;
        } else if !matches!(c, Some('\r' | '\n'))
            && !piece.is_number(pos)
            && (piece.is_letter(pos) || piece.is_letter(pos + 1))
        {
            // One codepoint (a letter, or any non-number prefix), then letters.
            pos = (pos + 1..)
                .find(|&p| !piece.is_letter(p))
                .unwrap_or(pos + 1);
        } else if piece.is_number(pos) {
            // Digits in threes; the last group takes what is left.
            let end = (pos..).find(|&p| !piece.is_number(p)).unwrap_or(pos);
            while end - pos > 3 {
                pos += 3;
                lens.push(3);
            }
            lens.push(end - pos);
            pos = end;
            continue;
        } else if piece.is_other(after_space) || (after_space > pos && after_space == piece.len()) {
            // ` ?[^\s\p{L}\p{N}]+[\r\n]*` (a lone space ending the piece is taken here, as in
            // llama.cpp).
            pos = (after_space..)
                .find(|&p| !piece.is_other(p))
                .unwrap_or(after_space);
            while matches!(piece.char(pos), Some('\r' | '\n')) {
                pos += 1;
            }
        } else {
            let (n, line_break_end) = piece.whitespace_run(pos);
            pos = line_break_end.unwrap_or_else(|| piece.whitespace_end(pos, n));
        }
        lens.push(pos - start);
    }
}

#[cfg(test)]
mod tests;
