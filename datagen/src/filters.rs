//! The chain-of-thought filters of the R1 report (§2.3.3): traces that mix languages, have
//! over-long paragraphs or code blocks are removed, as are traces that loop or never finish,
//! and length limits. Each is switchable and counted.

use std::collections::HashMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filter {
    /// Reasoning in a script the problem is not written in (R1-Zero's English/Chinese mixing).
    LanguageMixing,
    /// A paragraph longer than `max_paragraph_chars`.
    LongParagraph,
    /// A fenced code block in the reasoning or the answer.
    CodeBlock,
    /// The same text repeated over and over (a decoding loop).
    Repetition,
    /// No closing `</think>`, no answer after it, or cut by `max_tokens` (`finish_reason = length`).
    Incomplete,
    /// Completion tokens outside `[min_tokens, max_tokens]`.
    Length,
}

pub const ALL: [Filter; 6] =
    [Filter::LanguageMixing, Filter::LongParagraph, Filter::CodeBlock, Filter::Repetition, Filter::Incomplete, Filter::Length];

impl Filter {
    pub fn name(self) -> &'static str {
        match self {
            Filter::LanguageMixing => "language-mixing",
            Filter::LongParagraph => "long-paragraph",
            Filter::CodeBlock => "code-block",
            Filter::Repetition => "repetition",
            Filter::Incomplete => "incomplete",
            Filter::Length => "length",
        }
    }
}

impl FromStr for Filter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            format!("unknown filter `{s}`; choose from {}", ALL.map(Filter::name).join(", "))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterConfig {
    pub enabled: Vec<Filter>,
    pub max_paragraph_chars: usize,
    pub min_tokens: u64,
    pub max_tokens: u64,
    /// Characters of a foreign script, as a fraction of the reasoning's letters, above which
    /// the trace is mixed (a few foreign names or symbols are fine).
    pub max_foreign_fraction: f64,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig { enabled: ALL.to_vec(), max_paragraph_chars: 4000, min_tokens: 1, max_tokens: u64::MAX, max_foreign_fraction: 0.01 }
    }
}

/// What the filters look at.
pub struct Sample<'a> {
    pub problem: &'a str,
    pub reasoning: Option<&'a str>,
    /// Empty when the reasoning never closed (see `reasoning::split`).
    pub content: &'a str,
    pub finish_reason: Option<&'a str>,
    pub completion_tokens: Option<u64>,
}

/// The enabled filters `sample` fails, in [`ALL`] order.
pub fn failed(sample: &Sample, config: &FilterConfig) -> Vec<Filter> {
    ALL.into_iter()
        .filter(|f| config.enabled.contains(f))
        .filter(|&f| match f {
            Filter::LanguageMixing => mixes_languages(sample.problem, sample.reasoning.unwrap_or("") , config.max_foreign_fraction)
                || mixes_languages(sample.problem, sample.content, config.max_foreign_fraction),
            Filter::LongParagraph => [sample.reasoning.unwrap_or(""), sample.content]
                .iter()
                .any(|text| text.split("\n\n").any(|p| p.chars().count() > config.max_paragraph_chars)),
            Filter::CodeBlock => sample.reasoning.unwrap_or("").contains("```") || sample.content.contains("```"),
            Filter::Repetition => loops(sample.reasoning.unwrap_or("")) || loops(sample.content),
            Filter::Incomplete => {
                sample.finish_reason == Some("length") || sample.content.trim().is_empty()
            }
            Filter::Length => sample.completion_tokens.is_some_and(|n| n < config.min_tokens || n > config.max_tokens),
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Script {
    Latin,
    Cjk,
    Cyrillic,
    Other,
}

/// The script of a letter; digits, punctuation, math and Greek (mathematical notation) are
/// not counted.
fn script(c: char) -> Option<Script> {
    if !c.is_alphabetic() {
        return None;
    }
    Some(match c as u32 {
        0x0041..=0x024F => Script::Latin,
        0x0370..=0x03FF => return None,
        0x0400..=0x04FF => Script::Cyrillic,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF => Script::Cjk,
        0x2100..=0x214F | 0x1D400..=0x1D7FF => return None, // letterlike and math alphanumerics
        _ => Script::Other,
    })
}

/// Letters by script.
fn scripts(text: &str) -> HashMap<Script, usize> {
    let mut counts = HashMap::new();
    for script in text.chars().filter_map(script) {
        *counts.entry(script).or_insert(0) += 1;
    }
    counts
}

/// The text is mostly in a script the problem does not use.
fn mixes_languages(problem: &str, text: &str, max_foreign_fraction: f64) -> bool {
    let allowed = scripts(problem);
    let allowed: Vec<Script> = if allowed.is_empty() { vec![Script::Latin] } else { allowed.into_keys().collect() };
    let counts = scripts(text);
    let letters: usize = counts.values().sum();
    let foreign: usize = counts.iter().filter(|(s, _)| !allowed.contains(s)).map(|(_, n)| n).sum();
    // A handful of foreign letters (a name, a unit) is not mixing.
    foreign >= 8 && foreign as f64 > max_foreign_fraction * letters as f64
}

/// A decoding loop: a line of some substance that recurs many times, or a tail that is one
/// short stretch repeated.
fn loops(text: &str) -> bool {
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for line in text.lines().map(str::trim).filter(|l| l.chars().count() >= 30) {
        let count = lines.entry(line).or_insert(0);
        *count += 1;
        if *count >= 10 {
            return true;
        }
    }
    // The last 2,000 characters made of one period (up to 300 characters) repeated.
    let tail: Vec<char> = text.chars().rev().take(2000).collect();
    if tail.len() < 400 {
        return false;
    }
    (8..=300).any(|period| {
        let repeats = tail.len() / period;
        repeats >= 6 && (period..repeats * period).all(|i| tail[i] == tail[i - period])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(problem: &'a str, reasoning: &'a str, content: &'a str) -> Sample<'a> {
        Sample { problem, reasoning: Some(reasoning), content, finish_reason: Some("stop"), completion_tokens: Some(100) }
    }

    #[test]
    fn each_filter_catches_its_case_and_passes_a_clean_trace() {
        let config = FilterConfig::default();
        let clean = sample("What is 2+2?", "Adding 2 and 2 gives 4. Let α = 4; then α is 4.", "The answer is \\boxed{4}.");
        assert!(failed(&clean, &config).is_empty());
        let mixed = sample("What is 2+2?", "Adding 2 and 2. 我们先计算两个数的和，然后得到结果四。 So 4.", "\\boxed{4}");
        assert_eq!(failed(&mixed, &config), vec![Filter::LanguageMixing]);
        let chinese = sample("计算二加二。", "我们先计算两个数的和，然后得到结果四。", "\\boxed{4}");
        assert!(failed(&chinese, &config).is_empty(), "Chinese problem, Chinese reasoning");
        let long: String = (0..1000).map(|i| format!("w{i} ")).collect();
        assert_eq!(failed(&sample("q", &long, "4"), &config), vec![Filter::LongParagraph]);
        assert_eq!(failed(&sample("q", "```python\nprint(4)\n```", "4"), &config), vec![Filter::CodeBlock]);
        let looping = format!("start\n{}", "Wait, let me check the computation again carefully.\n".repeat(12));
        assert_eq!(failed(&sample("q", &looping, "4"), &config), vec![Filter::Repetition]);
        let tail_loop = format!("start {}", "so 4 is 4 and ".repeat(200));
        assert_eq!(failed(&sample("q", &tail_loop, "4"), &config), vec![Filter::Repetition]);
        let cut = Sample { finish_reason: Some("length"), ..sample("q", "thinking", "") };
        assert_eq!(failed(&cut, &config), vec![Filter::Incomplete]);
        let bounded = FilterConfig { max_tokens: 50, ..FilterConfig::default() };
        assert_eq!(failed(&clean, &bounded), vec![Filter::Length]);
        let off = FilterConfig { enabled: vec![], ..FilterConfig::default() };
        assert!(failed(&cut, &off).is_empty());
        assert_eq!("code-block".parse::<Filter>(), Ok(Filter::CodeBlock));
        assert!("nope".parse::<Filter>().is_err());
    }
}
