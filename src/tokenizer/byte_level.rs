//! GPT-2's byte-level alphabet (`bytes_to_unicode` in OpenAI's encoder.py, llama.cpp's
//! `unicode_byte_to_utf8`): every byte stands for one printable character, so byte-level BPE
//! vocabularies hold text, not raw bytes. Printable Latin-1 bytes stand for themselves; the 68
//! others (controls, space, DEL, NBSP, soft hyphen) take U+0100.. in byte order.

/// Bytes that stand for themselves: '!'..='~', '¡'..='¬', '®'..='ÿ'.
fn is_printable(byte: u8) -> bool {
    matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The character that stands for `byte`.
pub(super) fn byte_to_char(byte: u8) -> char {
    if is_printable(byte) {
        return char::from(byte);
    }
    // Rank of `byte` among the non-printable bytes: 0x00..=0x20, 0x7F..=0xA0, 0xAD.
    let rank = match byte {
        0x00..=0x20 => u32::from(byte),
        0x7F..=0xA0 => 0x21 + u32::from(byte - 0x7F),
        _ => 0x21 + 0x22,
    };
    char::from_u32(0x100 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The byte `c` stands for, if it is in the alphabet.
pub(super) fn char_to_byte(c: char) -> Option<u8> {
    let code = u32::from(c);
    if let Ok(byte) = u8::try_from(code) {
        return is_printable(byte).then_some(byte);
    }
    match code.checked_sub(0x100)? {
        rank @ 0..=0x20 => u8::try_from(rank).ok(),
        rank @ 0x21..=0x42 => u8::try_from(rank - 0x21 + 0x7F).ok(),
        0x43 => Some(0xAD),
        _ => None,
    }
}

/// Appends the byte-level spelling of `text`'s UTF-8 bytes.
pub(super) fn encode_into(text: &str, out: &mut String) {
    out.extend(text.bytes().map(byte_to_char));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alphabet_is_a_bijection_onto_256_characters() {
        let chars: Vec<char> = (0..=255u8).map(byte_to_char).collect();
        let mut distinct = chars.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 256);
        for (byte, &c) in (0..=255u8).zip(&chars) {
            assert_eq!(char_to_byte(c), Some(byte), "{c:?}");
        }
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte(' '), None);
    }

    #[test]
    fn known_spellings() {
        // 'Ġ' is GPT-2's space, 'Ċ' its newline, 'ĉ' its tab.
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(0x7F), '\u{121}');
        assert_eq!(byte_to_char(0xA0), '\u{142}');
        assert_eq!(byte_to_char(0xAD), '\u{143}');
        let mut out = String::new();
        encode_into(" é", &mut out);
        assert_eq!(out, "ĠÃ©");
    }
}
