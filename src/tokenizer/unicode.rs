//! Codepoint classes as llama.cpp's `unicode.cpp` sees them: each codepoint belongs to exactly
//! one general-category class (`\p{N}`, `\p{L}`, `\p{Z}`, `\p{M}`, `\p{P}`, `\p{S}`, `\p{C}`),
//! and whitespace is Unicode's White_Space property (llama.cpp's tables come from Python's
//! `regex` module: `\p{C}` there includes unassigned codepoints, so no codepoint is unclassed).

use unicode_general_category::{get_general_category, GeneralCategory};

/// One codepoint's general-category class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Number,
    Letter,
    Separator,
    Mark,
    Punctuation,
    Symbol,
    /// `\p{C}`: control, format, private use, surrogate and unassigned codepoints.
    Other,
}

impl Class {
    pub(super) fn of(c: char) -> Class {
        use GeneralCategory::*;
        match get_general_category(c) {
            DecimalNumber | LetterNumber | OtherNumber => Class::Number,
            UppercaseLetter | LowercaseLetter | TitlecaseLetter | ModifierLetter | OtherLetter => {
                Class::Letter
            }
            SpaceSeparator | LineSeparator | ParagraphSeparator => Class::Separator,
            NonspacingMark | SpacingMark | EnclosingMark => Class::Mark,
            ConnectorPunctuation | DashPunctuation | OpenPunctuation | ClosePunctuation
            | InitialPunctuation | FinalPunctuation | OtherPunctuation => Class::Punctuation,
            MathSymbol | CurrencySymbol | ModifierSymbol | OtherSymbol => Class::Symbol,
            // Control, Format, PrivateUse, Surrogate, Unassigned, and categories Unicode may
            // add (the enum is non-exhaustive).
            _ => Class::Other,
        }
    }
}

/// What llama.cpp's hand-written splitters ask of a codepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Flags {
    pub class: Class,
    pub is_whitespace: bool,
}

impl Flags {
    pub(super) fn of(c: char) -> Flags {
        Flags {
            class: Class::of(c),
            // Rust's `char::is_whitespace` is the White_Space property, llama.cpp's `\s` table.
            is_whitespace: c.is_whitespace(),
        }
    }

    pub(super) fn is_letter(self) -> bool {
        self.class == Class::Letter
    }

    pub(super) fn is_number(self) -> bool {
        self.class == Class::Number
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_general_category() {
        assert_eq!(Class::of('a'), Class::Letter);
        assert_eq!(Class::of('語'), Class::Letter);
        assert_eq!(Class::of('7'), Class::Number);
        assert_eq!(Class::of('½'), Class::Number);
        assert_eq!(Class::of('\u{0301}'), Class::Mark);
        assert_eq!(Class::of('!'), Class::Punctuation);
        assert_eq!(Class::of('～'), Class::Symbol);
        assert_eq!(Class::of('~'), Class::Symbol);
        assert_eq!(Class::of('🙂'), Class::Symbol);
        assert_eq!(Class::of(' '), Class::Separator);
        assert_eq!(Class::of('\u{200d}'), Class::Other);
        assert_eq!(Class::of('\u{e000}'), Class::Other);
        assert_eq!(Class::of('\u{10ffff}'), Class::Other);
    }

    #[test]
    fn whitespace_is_the_white_space_property() {
        for c in [
            '\t', '\n', '\u{b}', '\u{c}', '\r', ' ', '\u{85}', '\u{a0}', '\u{3000}',
        ] {
            assert!(Flags::of(c).is_whitespace, "{c:?}");
        }
        // Python's str.isspace() says yes to these, White_Space (and llama.cpp) says no.
        for c in ['\u{1c}', '\u{1f}', '\u{200b}'] {
            assert!(!Flags::of(c).is_whitespace, "{c:?}");
        }
    }
}
