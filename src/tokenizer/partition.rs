//! Splitting text at the texts of special tokens before tokenizing (llama.cpp's
//! `tokenizer_st_partition`): each special token in turn, longest first, cuts every occurrence
//! out of the text fragments left by the ones before it.

/// A piece of the input: text still to tokenize, or a special token found in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// Cuts `specials` (id, non-empty text), in the order given, out of `text`.
pub(super) fn partition<'t, 's>(
    text: &'t str,
    specials: impl Iterator<Item = (u32, &'s str)>,
) -> Vec<Fragment<'t>> {
    let mut fragments = Vec::new();
    if !text.is_empty() {
        fragments.push(Fragment::Text(text));
    }
    for (id, special) in specials {
        if !fragments
            .iter()
            .any(|f| matches!(f, Fragment::Text(t) if t.contains(special)))
        {
            continue;
        }
        let mut cut = Vec::with_capacity(fragments.len() + 2);
        for fragment in fragments {
            let Fragment::Text(mut rest) = fragment else {
                cut.push(fragment);
                continue;
            };
            while let Some(at) = rest.find(special) {
                if at > 0 {
                    cut.push(Fragment::Text(&rest[..at]));
                }
                cut.push(Fragment::Token(id));
                rest = &rest[at + special.len()..];
            }
            if !rest.is_empty() {
                cut.push(Fragment::Text(rest));
            }
        }
        fragments = cut;
    }
    fragments
}

#[cfg(test)]
mod tests {
    use super::Fragment::{Text, Token};
    use super::*;

    #[test]
    fn longer_specials_cut_first_and_every_occurrence_is_cut() {
        let specials = [(7, "<|im_start|>"), (5, "<s>"), (9, "<")];
        let fragments = partition("<s>a<|im_start|>b<s><s>", specials.into_iter());
        assert_eq!(
            fragments,
            [Token(5), Text("a"), Token(7), Text("b"), Token(5), Token(5)]
        );
    }

    #[test]
    fn text_without_specials_is_one_fragment_and_empty_text_none() {
        assert_eq!(
            partition("plain", [(1, "<s>")].into_iter()),
            [Text("plain")]
        );
        assert_eq!(partition("", [(1, "<s>")].into_iter()), []);
        assert_eq!(
            partition("<<", [(9, "<")].into_iter()),
            [Token(9), Token(9)]
        );
    }
}
