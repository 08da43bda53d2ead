//! Where a teacher's reasoning comes back: OpenAI-compatible servers disagree.
//!
//! * `reasoning_content`: the DeepSeek API, SGLang and vLLM before 0.9 with `--reasoning-parser`;
//! * `reasoning`: newer vLLM and OpenRouter;
//! * `<think>…</think>` inside `content`: any server without a reasoning parser. R1's chat
//!   template pre-fills `<think>\n` after the generation prompt, so the model's own output then
//!   has no opening tag and starts inside the reasoning.

use serde::{Deserialize, Serialize};

/// Which of the shapes above a completion had; recorded on every row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningParser {
    ReasoningContent,
    Reasoning,
    /// `<think>…</think>` in `content`.
    ThinkTags,
    /// `…</think>` in `content`: the opening tag was pre-filled by the chat template.
    ThinkTagsPrefilled,
    /// No reasoning found.
    None,
}

impl ReasoningParser {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningParser::ReasoningContent => "reasoning_content",
            ReasoningParser::Reasoning => "reasoning",
            ReasoningParser::ThinkTags => "think_tags",
            ReasoningParser::ThinkTagsPrefilled => "think_tags_prefilled",
            ReasoningParser::None => "none",
        }
    }
}

/// Reasoning and answer of one completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub reasoning: Option<String>,
    pub content: String,
    pub parser: ReasoningParser,
    /// The reasoning never closed (`<think>` without `</think>`): the trace is incomplete.
    pub unclosed: bool,
}

/// Separates reasoning from the answer, from whichever field carried it.
pub fn split(reasoning_content: Option<&str>, reasoning: Option<&str>, content: &str) -> Split {
    let present = |s: Option<&str>| s.filter(|s| !s.trim().is_empty()).map(str::to_string);
    if let Some(text) = present(reasoning_content) {
        return Split { reasoning: Some(text), content: content.to_string(), parser: ReasoningParser::ReasoningContent, unclosed: false };
    }
    if let Some(text) = present(reasoning) {
        return Split { reasoning: Some(text), content: content.to_string(), parser: ReasoningParser::Reasoning, unclosed: false };
    }
    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";
    let close = content.find(CLOSE);
    match (content.find(OPEN), close) {
        (Some(open), Some(close)) if open < close => Split {
            reasoning: Some(content[open + OPEN.len()..close].trim_matches('\n').to_string()),
            content: content[close + CLOSE.len()..].trim_start().to_string(),
            parser: ReasoningParser::ThinkTags,
            unclosed: false,
        },
        (Some(open), _) => Split {
            reasoning: Some(content[open + OPEN.len()..].trim_matches('\n').to_string()),
            content: String::new(),
            parser: ReasoningParser::ThinkTags,
            unclosed: true,
        },
        (None, Some(close)) => Split {
            reasoning: Some(content[..close].trim_matches('\n').to_string()),
            content: content[close + CLOSE.len()..].trim_start().to_string(),
            parser: ReasoningParser::ThinkTagsPrefilled,
            unclosed: false,
        },
        (None, None) => Split { reasoning: None, content: content.to_string(), parser: ReasoningParser::None, unclosed: false },
    }
}

/// The assistant turn as `distill train` and the R1-Distill models expect it:
/// `<think>\n…\n</think>\n\n…`.
pub fn assistant_turn(reasoning: Option<&str>, content: &str) -> String {
    match reasoning {
        Some(reasoning) => format!("<think>\n{}\n</think>\n\n{}", reasoning.trim_matches('\n'), content.trim_start()),
        None => content.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape() {
        let s = split(Some("think"), None, "42");
        assert_eq!((s.reasoning.as_deref(), s.content.as_str(), s.parser), (Some("think"), "42", ReasoningParser::ReasoningContent));
        let s = split(None, Some("think"), "42");
        assert_eq!(s.parser, ReasoningParser::Reasoning);
        let s = split(Some(""), None, "<think>\nstep\n</think>\n\nThe answer is 42.");
        assert_eq!((s.reasoning.as_deref(), s.content.as_str(), s.parser), (Some("step"), "The answer is 42.", ReasoningParser::ThinkTags));
        let s = split(None, None, "step one\nstep two\n</think>\n\n\\boxed{3}");
        assert_eq!((s.reasoning.as_deref(), s.content.as_str(), s.parser), (Some("step one\nstep two"), "\\boxed{3}", ReasoningParser::ThinkTagsPrefilled));
        let s = split(None, None, "<think>\nstill going");
        assert!(s.unclosed && s.content.is_empty());
        let s = split(None, None, "just an answer");
        assert_eq!((s.reasoning, s.parser), (None, ReasoningParser::None));
        assert_eq!(assistant_turn(Some("a"), "b"), "<think>\na\n</think>\n\nb");
    }
}
