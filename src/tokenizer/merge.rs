//! The merge loop both BPE flavours share (llama.cpp's `llm_tokenizer_spm_session` and
//! `llm_tokenizer_bpe_session`): start from single characters and keep merging the best
//! adjacent pair, the leftmost among equals, until no pair qualifies.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Two adjacent runs of the text being merged.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pair<'t> {
    pub left: &'t str,
    pub right: &'t str,
    /// `left` and `right` together.
    pub merged: &'t str,
}

/// Merges the characters of `text` into runs, best pair first by `priority` (greater is
/// better; `None`: the pair never merges). Returns the runs in order.
pub(super) fn merge<'t, P: Ord>(
    text: &'t str,
    mut priority: impl FnMut(Pair<'t>) -> Option<P>,
) -> impl Iterator<Item = &'t str> {
    let mut runs: Vec<Run> = text
        .char_indices()
        .map(|(start, c)| Run {
            start,
            len: c.len_utf8(),
        })
        .collect();
    // The runs still standing form a linked list: `next[i]` follows run i, `prev[i]` precedes it.
    let n_runs = runs.len();
    let mut next: Vec<usize> = (1..=n_runs).collect();
    let mut prev: Vec<Option<usize>> = (0..n_runs).map(|i| i.checked_sub(1)).collect();

    let mut queue = BinaryHeap::new();
    let mut candidate = |runs: &[Run], left: usize, right: usize| {
        let (l, r) = (runs[left], runs[right]);
        let pair = Pair {
            left: &text[l.start..l.end()],
            right: &text[r.start..r.end()],
            merged: &text[l.start..r.end()],
        };
        priority(pair).map(|priority| Candidate {
            priority,
            left: Reverse(left),
            right,
            len: pair.merged.len(),
        })
    };
    for left in 1..n_runs {
        queue.extend(candidate(&runs, left - 1, left));
    }

    while let Some(Candidate {
        left: Reverse(left),
        right,
        len,
        ..
    }) = queue.pop()
    {
        // Stale: a side was merged away, or grew, since this pair was queued. Runs only grow
        // to the right, so equal lengths mean the same text.
        if runs[left].len == 0 || runs[right].len == 0 || runs[left].len + runs[right].len != len {
            continue;
        }
        runs[left].len = len;
        runs[right].len = 0;
        next[left] = next[right];
        if next[left] < n_runs {
            prev[next[left]] = Some(left);
            queue.extend(candidate(&runs, left, next[left]));
        }
        if let Some(before) = prev[left] {
            queue.extend(candidate(&runs, before, left));
        }
    }

    runs.into_iter()
        .filter(|run| run.len > 0)
        .map(move |run| &text[run.start..run.end()])
}

/// A run of the text: one character, or characters merged.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: usize,
    /// Bytes; 0 once merged into the run on its left.
    len: usize,
}

impl Run {
    fn end(&self) -> usize {
        self.start + self.len
    }
}

/// A pair waiting in the queue: the greatest priority pops first, then the leftmost.
#[derive(Debug)]
struct Candidate<P> {
    priority: P,
    left: Reverse<usize>,
    right: usize,
    /// Bytes of the merged text, to recognise stale entries.
    len: usize,
}

impl<P: Ord> Ord for Candidate<P> {
    fn cmp(&self, other: &Self) -> Ordering {
        (&self.priority, self.left).cmp(&(&other.priority, other.left))
    }
}

impl<P: Ord> PartialOrd for Candidate<P> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<P: Ord> PartialEq for Candidate<P> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<P: Ord> Eq for Candidate<P> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(text: &str, pairs: &[(&str, u32)]) -> Vec<String> {
        // Priority: the pair's listed score, higher first.
        merge(text, |pair| {
            pairs
                .iter()
                .find(|(merged, _)| *merged == pair.merged)
                .map(|&(_, score)| score)
        })
        .map(str::to_string)
        .collect()
    }

    #[test]
    fn the_best_pair_merges_first() {
        // "bc" beats "ab", so "abc" becomes a + bc, and "abc" then forms no listed pair.
        assert_eq!(merged("abc", &[("ab", 1), ("bc", 2)]), ["a", "bc"]);
        assert_eq!(merged("abc", &[("ab", 2), ("bc", 1), ("abc", 1)]), ["abc"]);
    }

    #[test]
    fn equal_pairs_merge_leftmost_first() {
        // "aaa": both "aa" pairs tie; the left one merges, leaving "aa" + "a".
        assert_eq!(merged("aaa", &[("aa", 1)]), ["aa", "a"]);
        assert_eq!(merged("aaaa", &[("aa", 1), ("aaaa", 1)]), ["aaaa"]);
    }

    #[test]
    fn characters_stay_whole() {
        assert_eq!(merged("é🙂", &[]), ["é", "🙂"]);
        assert_eq!(merged("", &[]), Vec::<String>::new());
    }
}
