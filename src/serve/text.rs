//! A generation's text as tokens arrive: decoded in context (so that a word-initial space
//! survives), given out only when it cannot change (not a character cut in two, not what may
//! be the start of a stop string), and cut at the first stop string.

use std::sync::Arc;

use crate::tokenizer::Tokenizer;

pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    /// The last prompt token, decoded in front of the generated ones, and its text.
    context: Option<u32>,
    context_text: String,
    tokens: Vec<u32>,
    stops: Vec<String>,
    /// Bytes of text given out so far.
    sent: usize,
    stopped: bool,
}

impl TextStream {
    pub fn new(tokenizer: Arc<Tokenizer>, prompt: &[u32], stops: Vec<String>) -> TextStream {
        let context = prompt.last().copied();
        let context_text = context
            .and_then(|t| tokenizer.decode(&[t]).ok())
            .unwrap_or_default();
        TextStream {
            tokenizer,
            context,
            context_text,
            tokens: Vec::new(),
            stops,
            sent: 0,
            stopped: false,
        }
    }

    /// Whether a stop string has been reached (the generation should end).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text of the generated tokens (up to the first stop string).
    fn text(&self) -> String {
        let ids: Vec<u32> = self.context.iter().chain(&self.tokens).copied().collect();
        let full = self.tokenizer.decode(&ids).unwrap_or_default();
        match full.strip_prefix(&self.context_text) {
            Some(text) => text.to_string(),
            None => full,
        }
    }

    /// Adds a generated token; returns the text that is now final.
    pub fn push(&mut self, token: u32) -> String {
        if self.stopped {
            return String::new();
        }
        self.tokens.push(token);
        let text = self.text();
        if let Some(cut) = self.first_stop(&text) {
            self.stopped = true;
            return self.give_out(&text[..cut]);
        }
        let mut ready = text.trim_end_matches('\u{fffd}').len();
        ready -= self.stop_prefix_len(&text[..ready]);
        self.give_out(&text[..ready])
    }

    /// The rest of the text at the end of the generation.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let text = self.text();
        self.give_out(&text)
    }

    /// What of `upto` has not been given out; a text that changed under what was given out
    /// (a clean-up of spaces) gives out nothing more until it passes that point again.
    fn give_out(&mut self, upto: &str) -> String {
        match upto.get(self.sent..) {
            Some(new) => {
                self.sent = upto.len();
                new.to_string()
            }
            None => String::new(),
        }
    }

    /// Where the earliest stop string starts in `text`.
    fn first_stop(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// The length of the longest end of `text` that begins some stop string.
    fn stop_prefix_len(&self, text: &str) -> usize {
        self.stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len().min(text.len() + 1))
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
                    .take(1)
            })
            .max()
            .unwrap_or(0)
    }
}
