//! From tokens back to bytes: each token's piece (llama.cpp's `token_to_piece`) and the space
//! clean-up of its `detokenize`.

use super::byte_level;
use super::vocab::Attr;
use crate::error::{Error, Result};

/// How a vocabulary writes the text of its normal tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Spelling {
    /// SentencePiece: '▁' stands for a space.
    Spm,
    /// GPT-2's byte alphabet.
    ByteLevel,
}

/// A token's bytes when special tokens are rendered (llama.cpp's `token_to_piece` with
/// `special`, as cached at load): control, unknown and user-defined tokens as written, normal
/// ones unescaped, byte tokens `<0xNN>` as their byte, other types (unused, undefined) empty.
pub(super) fn piece(id: u32, text: &str, attr: Attr, spelling: Spelling) -> Result<Vec<u8>> {
    if attr.intersects(Attr::UNKNOWN | Attr::CONTROL | Attr::USER_DEFINED) {
        Ok(text.as_bytes().to_vec())
    } else if attr.intersects(Attr::NORMAL) {
        Ok(match spelling {
            Spelling::Spm => text.replace('▁', " ").into_bytes(),
            Spelling::ByteLevel => byte_level_bytes(text),
        })
    } else if attr.intersects(Attr::BYTE) {
        let byte = text
            .get(3..5)
            .filter(|_| text.starts_with("<0x") && text.len() == 6)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        byte.map(|byte| vec![byte]).ok_or_else(|| {
            Error::malformed(
                "tokenizer",
                format!("byte token {id} is {text:?}, not <0xNN>"),
            )
        })
    } else {
        Ok(Vec::new())
    }
}

/// The bytes a byte-level token spells. A character outside the alphabet (a broken vocabulary)
/// becomes llama.cpp's `[UNK_BYTE_0x..]` marker, token text included.
fn byte_level_bytes(text: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(text.len());
    for c in text.chars() {
        match byte_level::char_to_byte(c) {
            Some(byte) => bytes.push(byte),
            None => {
                bytes.extend_from_slice(b"[UNK_BYTE_0x");
                for b in c.encode_utf8(&mut [0; 4]).bytes() {
                    bytes.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                bytes.extend_from_slice(text.as_bytes());
                bytes.push(b']');
            }
        }
    }
    bytes
}

/// Hugging Face's `clean_up_tokenization_spaces`, in llama.cpp's three passes: drop the space
/// before "?!.,", around a lone "'" between spaces, and before "'s", "'m", "'re", "'ve".
/// Each pass rewrites the bytes in place, reading a byte's left neighbour as it was before the
/// pass (the second pass also blanks the space after a lone "'" to NUL before skipping it,
/// which the byte after reads): kept exactly, since it decides the text.
pub(super) fn clean_up_spaces(text: &mut Vec<u8>) {
    // " ?", " !", " .", " ,"
    clean_pass(text, |text, i, _| {
        text[i - 1] == b' ' && matches!(text[i], b'?' | b'!' | b'.' | b',')
    });
    // " ' "
    clean_pass(text, |text, i, skip_next| {
        let lone = text[i] == b'\'' && text.get(i + 1) == Some(&b' ') && text[i - 1] == b' ';
        if lone {
            text[i + 1] = 0;
            *skip_next = true;
        }
        lone
    });
    // " 's", " 'm", " 're", " 've" (not " 't", " 'd", " 'll")
    clean_pass(text, |text, i, _| {
        text[i - 1] == b' '
            && text[i] == b'\''
            && matches!(
                (text.get(i + 1), text.get(i + 2)),
                (Some(b's' | b'm'), _) | (Some(b'r' | b'v'), Some(b'e'))
            )
    });
}

/// One pass: keeps the first byte, then for each later byte asks `drops_space(text, i, skip)`
/// whether the byte written before it (a space) goes; `skip` set drops byte `i + 1` unread.
fn clean_pass(
    text: &mut Vec<u8>,
    mut drops_space: impl FnMut(&mut [u8], usize, &mut bool) -> bool,
) {
    let len = text.len();
    let mut written = usize::from(len > 0);
    let mut i = 1;
    while i < len {
        let byte = text[i];
        let mut skip_next = false;
        if drops_space(text, i, &mut skip_next) {
            written -= 1;
        }
        text[written] = byte;
        written += 1;
        i += if skip_next { 2 } else { 1 };
    }
    text.truncate(written);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cleaned(text: &str) -> String {
        let mut bytes = text.as_bytes().to_vec();
        clean_up_spaces(&mut bytes);
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn clean_up_follows_llama_cpp() {
        assert_eq!(cleaned("Hello , world !"), "Hello, world!");
        assert_eq!(cleaned("a ' b"), "a'b");
        assert_eq!(
            cleaned("it 's I 'm we 're you 've"),
            "it's I'm we're you've"
        );
        assert_eq!(cleaned("don 't I 'd we 'll"), "don 't I 'd we 'll");
        assert_eq!(cleaned(" ."), ".");
        assert_eq!(cleaned("?"), "?");
        assert_eq!(cleaned(""), "");
        // The second lone quote's left neighbour was blanked by the first: it stays.
        assert_eq!(cleaned("a ' ' b"), "a'' b");
    }

    #[test]
    fn pieces_by_attribute() {
        let spm = |text, attr| piece(0, text, attr, Spelling::Spm).unwrap();
        assert_eq!(spm("▁Hello▁", Attr::NORMAL), b" Hello ");
        assert_eq!(spm("<s>", Attr::CONTROL), b"<s>");
        assert_eq!(spm("<0x0A>", Attr::BYTE), b"\n");
        assert_eq!(spm("<0xF0>", Attr::BYTE), [0xF0]);
        assert_eq!(spm("<unused0>", Attr::UNUSED), b"");
        assert!(piece(5, "<0xZZ>", Attr::BYTE, Spelling::Spm).is_err());

        let bpe = |text| piece(0, text, Attr::NORMAL, Spelling::ByteLevel).unwrap();
        assert_eq!(bpe("ĠHello"), b" Hello");
        assert_eq!(bpe("Ã©"), "é".as_bytes());
        assert_eq!(bpe("Ċ"), b"\n");
        assert_eq!(bpe("a€"), b"a[UNK_BYTE_0xe282aca\xe2\x82\xac]");
    }
}
