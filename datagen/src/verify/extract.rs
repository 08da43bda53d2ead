//! Finding the final answer in a model response.

use std::sync::LazyLock;

use regex::Regex;

/// What to do when a response has several `\boxed{}` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultipleBoxed {
    /// The last one counts (R1's and Math-Verify's convention).
    #[default]
    Last,
    /// Every boxed answer must be the same (after normalisation); otherwise there is none.
    AllAgree,
}

/// Where an answer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Boxed,
    FinalAnswerPhrase,
    LastMath,
    WholeText,
}

/// The part of a response that counts: after the last `</think>` when there is one.
pub fn strip_reasoning(response: &str) -> &str {
    match response.rfind("</think>") {
        Some(end) => &response[end + "</think>".len()..],
        None => response,
    }
}

/// Contents of every `\boxed{…}` / `\fbox{…}` (balanced braces, nested), and `\boxed 5`.
pub fn boxed_contents(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    let mut search = 0;
    while search < bytes.len() {
        let next = ["\\boxed", "\\fbox"]
            .iter()
            .filter_map(|command| text[search..].find(command).map(|at| (search + at, command.len())))
            .min();
        let Some((at, length)) = next else { break };
        let mut i = at + length;
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'{' {
            let mut depth = 0usize;
            let start = i + 1;
            let mut end = None;
            for (offset, &byte) in bytes[i..].iter().enumerate() {
                match byte {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(i + offset);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            match end {
                Some(end) => {
                    found.push(&text[start..end]);
                    search = end + 1;
                }
                // Unbalanced: nothing after this point can close, stop looking.
                None => break,
            }
        } else if i > at + length {
            // `\boxed 5`: up to the next space or `$`.
            let end = text[i..].find([' ', '$', '\n']).map_or(text.len(), |e| i + e);
            if end > i {
                found.push(&text[i..end]);
            }
            search = end.max(i + 1);
        } else {
            search = i.max(at + 1);
        }
    }
    found
}

static FINAL_ANSWER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)(?:final answer(?: is)?|\*\*answer:?\*\*|answer\s*:|(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s+is)\s*:?\s*(.+?)\s*(?:\n|$)",
    )
    .expect("static regex")
});
/// The Minerva / MATH few-shot sign-off.
static HOPE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)[.\s]*I hope it is correct[.!]?\s*$").expect("static regex"));
static INLINE_MATH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\$\$([^$]+)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|\$([^$]+)\$").expect("static regex"));

static LEADING_CHOICE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\(?[A-E]\)[\s.:]").expect("static regex"));
static BOLD_LINE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\*\*([^*]{1,80})\*\*\.?$").expect("static regex"));
/// A word of prose: two or more letters that are not a LaTeX command's name.
static WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?:^|[^\\a-zA-Z])[a-zA-Z]{2,}").expect("static regex"));
/// A bare answer has fewer words than this ("no solution", "all real numbers"); more is a sentence.
const MAX_BARE_WORDS: usize = 4;

/// The answer of a response, and where it was found. `None` when there is none.
/// `same` decides whether two boxed answers agree (for [`MultipleBoxed::AllAgree`]).
pub fn extract_answer(
    response: &str,
    multiple: MultipleBoxed,
    same: impl Fn(&str, &str) -> bool,
) -> Option<(String, Source)> {
    let text = strip_reasoning(response);
    // An empty `\boxed{}` (a formatting slip) is no answer.
    let boxed: Vec<&str> = boxed_contents(text).into_iter().filter(|b| !b.trim().is_empty()).collect();
    if let Some(last) = boxed.last() {
        if multiple == MultipleBoxed::AllAgree && boxed.iter().any(|b| !same(b, last)) {
            return None;
        }
        return Some((last.trim().to_string(), Source::Boxed));
    }
    // GSM8K's `#### 72` closes a worked solution.
    if let Some(at) = text.rfind("\n####").map(|at| at + 1).or_else(|| text.starts_with("####").then_some(0)) {
        let answer = text[at + 4..].lines().next().unwrap_or("").trim();
        if !answer.is_empty() {
            return Some((answer.to_string(), Source::FinalAnswerPhrase));
        }
    }
    if let Some(answer) = phrase_answer(text) {
        return Some((answer, Source::FinalAnswerPhrase));
    }
    // A last line in bold (`**40**`) is how chat models set off an answer.
    if let Some(bold) = text.lines().rev().find(|l| !l.trim().is_empty()).and_then(|l| BOLD_LINE.captures(l.trim())) {
        return Some((bold[1].trim().to_string(), Source::FinalAnswerPhrase));
    }
    // The last math span, unless prose after it holds a number: in "Given $42$ apples, the
    // total is 50." the math is a premise and the answer is in words; nothing is extracted.
    if let Some(captures) = INLINE_MATH.captures_iter(text).last() {
        let span = captures.get(0).map_or(text.len(), |m| m.end());
        let math = captures.iter().skip(1).flatten().next().map(|m| m.as_str().trim()).unwrap_or("");
        let empty_box = math.replace("\\boxed{}", "").trim().is_empty();
        if !empty_box && !text[span..].chars().any(|c| c.is_ascii_digit()) {
            return Some((math.to_string(), Source::LastMath));
        }
        return None;
    }
    // A bare answer ("42", "x = 3", "no solution"), never a sentence: "I could not finish the
    // computation." is no answer, not a product of letters to compare with the gold.
    let trimmed = text.trim();
    let words = WORD.find_iter(trimmed).count();
    if !trimmed.is_empty() && trimmed.chars().count() <= 80 && !trimmed.contains('\n') && words < MAX_BARE_WORDS {
        return Some((trimmed.to_string(), Source::WholeText));
    }
    None
}

/// The answer of the last answer sentence: its innermost phrase (`Final Answer: The final answer
/// is $78$. I hope it is correct.` → `78`), the last math span in it if it has one, without
/// bold markers or trailing punctuation. `None` when the sentence holds nothing.
fn phrase_answer(text: &str) -> Option<String> {
    let mut answer = FINAL_ANSWER.captures_iter(text).last()?[1].to_string();
    for _ in 0..4 {
        match FINAL_ANSWER.captures(&answer) {
            Some(inner) => answer = inner[1].to_string(),
            None => break,
        }
    }
    let answer = HOPE.replace(&answer, "").into_owned();
    let answer = match INLINE_MATH.captures_iter(&answer).last() {
        // `(D) $x^2+C$`: a choice letter with its value; the letter is the answer.
        Some(_) if LEADING_CHOICE.is_match(answer.trim_start_matches('*')) => answer.replace('$', ""),
        Some(math) => math.iter().skip(1).flatten().next().map_or(String::new(), |m| m.as_str().to_string()),
        None => answer,
    };
    let answer = answer.replace("**", "");
    let answer = answer.trim().trim_end_matches(['.', ',', ';']).trim();
    (!answer.is_empty()).then(|| answer.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract_answer(response: &str, multiple: MultipleBoxed) -> Option<(String, Source)> {
        super::extract_answer(response, multiple, |a, b| crate::verify::verify_answers(b, a, &Default::default()).correct())
    }

    #[test]
    fn nested_and_multiple_boxes() {
        assert_eq!(boxed_contents(r"a \boxed{\frac{1}{2}} b \fbox{3}"), vec![r"\frac{1}{2}", "3"]);
        assert_eq!(boxed_contents(r"\boxed 5 then"), vec!["5"]);
        assert_eq!(boxed_contents(r"\boxed{unbalanced {"), Vec::<&str>::new());
    }

    #[test]
    fn answer_outside_think_wins() {
        let response = "<think>\nmaybe \\boxed{3}\n</think>\n\nSo \\boxed{4}.";
        assert_eq!(extract_answer(response, MultipleBoxed::Last).unwrap().0, "4");
        let disagreeing = r"\boxed{1} and \boxed{2}";
        assert!(extract_answer(disagreeing, MultipleBoxed::AllAgree).is_none());
        assert_eq!(extract_answer(r"\boxed{2} or \boxed{2.0}", MultipleBoxed::AllAgree).unwrap().0, "2.0");
    }

    #[test]
    fn phrases_and_math() {
        assert_eq!(extract_answer("blah\nThe final answer is 12.", MultipleBoxed::Last).unwrap().0, "12");
        assert_eq!(extract_answer("work\n**Answer:** $x=3$\n", MultipleBoxed::Last).unwrap().0, "x=3");
        let minerva = "We add.\nFinal Answer: The final answer is $78$. I hope it is correct.";
        assert_eq!(extract_answer(minerva, MultipleBoxed::Last).unwrap().0, "78");
        assert_eq!(extract_answer("So x = 4. The answer is 4.", MultipleBoxed::Last).unwrap().0, "4");
        assert_eq!(extract_answer("The answer is **9**.", MultipleBoxed::Last).unwrap().0, "9");
        assert_eq!(extract_answer("**Final Answer**\n\\[ 17 \\]", MultipleBoxed::Last).unwrap().0, "17");
        assert_eq!(extract_answer("no solution", MultipleBoxed::Last).unwrap().0, "no solution");
        assert_eq!(extract_answer("Since $6 \\cdot 7 = 42$, we subtract 2.\n\n**40**", MultipleBoxed::Last).unwrap().0, "40");
        assert_eq!(extract_answer("Given $42$ apples, the total is 50.", MultipleBoxed::Last), None);
        assert_eq!(extract_answer("So it is $\\boxed{}$.", MultipleBoxed::Last), None);
        assert_eq!(extract_answer("The total is $50$ apples.", MultipleBoxed::Last).unwrap().0, "50");
        assert_eq!(extract_answer(r"5 \text{ apples}", MultipleBoxed::Last).unwrap().0, r"5 \text{ apples}");
        assert_eq!(extract_answer("I could not finish the computation.", MultipleBoxed::Last), None);
        assert_eq!(extract_answer("<think>\\boxed{5}</think>I am not sure about this.", MultipleBoxed::Last), None);
        assert_eq!(extract_answer("we get $y$ and finally $7$ apples.\nmore words here to be long enough", MultipleBoxed::Last).unwrap().0, "7");
    }
}
