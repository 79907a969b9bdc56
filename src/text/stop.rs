//! Stop matching over streamed text: a marker or stop string may arrive split over several
//! pieces, so text that might begin one is held back until it is decided.

/// Length of the longest suffix of `text` that is a proper prefix of `marker` (so it might
/// become the marker once more text arrives).
pub fn partial_suffix(text: &str, marker: &str) -> usize {
    let max = text.len().min(marker.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&k| marker.is_char_boundary(k) && text.ends_with(&marker[..k]))
        .unwrap_or(0)
}

/// Where the first occurrence of any non-empty stop string in `text` begins.
pub fn earliest_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// A request's stop strings over its decoded output: the output ends right before the first
/// one, which is not returned.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text held back because it might begin a stop string.
    pending: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops,
            pending: String::new(),
        }
    }

    /// Adds a piece of output; returns the text that became final and whether a stop string
    /// completed (the output then ends with that text).
    pub fn push(&mut self, text: String) -> (String, bool) {
        if self.stops.is_empty() {
            return (text, false);
        }
        self.pending.push_str(&text);
        if let Some(pos) = earliest_stop(&self.pending, &self.stops) {
            self.pending.truncate(pos);
            return (std::mem::take(&mut self.pending), true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (text, false)
    }

    /// The end of the output: the text held back, then `rest` (what the decoder still held),
    /// cut before a stop string.
    pub fn finish(&mut self, rest: &str) -> String {
        let mut text = std::mem::take(&mut self.pending);
        text.push_str(rest);
        if let Some(pos) = earliest_stop(&text, &self.stops) {
            text.truncate(pos);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_suffix_is_a_proper_prefix_on_char_boundaries() {
        assert_eq!(partial_suffix("abc</th", "</think>"), 4);
        assert_eq!(partial_suffix("abc", "</think>"), 0);
        // The whole marker is not partial.
        assert_eq!(partial_suffix("</think>", "</think>"), 0);
        // A multi-byte character is matched whole or not at all.
        assert_eq!(partial_suffix("x\u{ff5c}", "\u{ff5c}tool"), 3);
        assert_eq!(partial_suffix("x\u{ff5c}", ""), 0);
    }

    #[test]
    fn stop_strings_hold_back_possible_starts_and_cut_before_the_first() {
        let mut s = StopStrings::new(vec!["".into(), "STOP".into(), "END".into()]);
        assert_eq!(s.push("hello S".into()), ("hello ".into(), false));
        assert_eq!(s.push("T".into()), (String::new(), false));
        // Not a stop after all: the held text is released.
        assert_eq!(s.push("x".into()), ("STx".into(), false));
        assert_eq!(s.push(" a END b STOP".into()), (" a ".into(), true));

        let mut s = StopStrings::new(vec!["STOP".into()]);
        assert_eq!(s.push("abc ST".into()), ("abc ".into(), false));
        assert_eq!(s.finish("OP tail"), "");
        let mut s = StopStrings::new(vec!["STOP".into()]);
        assert_eq!(s.push("abc ST".into()), ("abc ".into(), false));
        assert_eq!(s.finish("!"), "ST!");

        let mut none = StopStrings::default();
        assert_eq!(none.push("STOP".into()), ("STOP".into(), false));
        assert_eq!(none.finish("rest"), "rest");
    }
}
