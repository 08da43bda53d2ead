//! The math answer verifier: extraction, normalisation and equivalence of final answers.
//!
//! Pure and thread-safe (no global mutable state, no signals); every call runs under a step
//! and time budget and never panics, whatever the input.

pub mod equivalence;
pub mod evaluate;
pub mod extract;
pub mod normalize;
pub mod parse;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use regex::Regex;
use serde::Serialize;

pub use extract::{MultipleBoxed, Source, extract_answer};

use equivalence::Comparer;
use evaluate::{Budget, EvalError};
use normalize::normalize;
use parse::{Answer, parse_answer};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VerifyConfig {
    pub multiple_boxed: MultipleBoxed,
    /// Relative tolerance when an answer is not an exact rational (π, radicals, decimals of
    /// irrationals): |a − b| ≤ tol · max(1, |a|, |b|).
    pub relative_tolerance: f64,
    /// Evaluation steps allowed per pair.
    pub max_steps: u64,
    /// Wall-clock budget per pair.
    pub time_budget: Duration,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            multiple_boxed: MultipleBoxed::Last,
            relative_tolerance: 1e-10,
            max_steps: 200_000,
            time_budget: Duration::from_millis(200),
        }
    }
}

/// The verdict on one (gold, prediction) pair.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub correct: bool,
    /// The answer found in the prediction, as written.
    pub extracted: Option<String>,
    /// Where it was found.
    pub source: Option<Source>,
    /// Why the pair matched or not.
    pub explanation: String,
}

/// Answers longer than this are compared as text only: no real final answer is that long,
/// and parsing it would only spend the budget.
const MAX_PARSED_LENGTH: usize = 2_000;

static CHOICE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\(?([A-Ea-e])\)?$").expect("static regex"));
static PRED_CHOICE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:\\text\{)?\(?([A-Ea-e])\)?(?:$|[\s.:)}])").expect("static regex"));
static DECIMAL_POINT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^-?\d+\.\d+$").expect("static regex"));
static DECIMAL_COMMA: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^-?\d+,\d+$").expect("static regex"));
static ENVIRONMENT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\\(?:begin|end)\{[a-z*]*\}").expect("static regex"));
static WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?:^|[^\\a-zA-Z])[a-zA-Z]{3,}").expect("static regex"));

/// Text answers compare case- and space-insensitively, without LaTeX text markup.
fn text_key(s: &str) -> String {
    s.replace("\\text", "")
        .replace("\\mathrm", "")
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '{' | '}' | '\\' | '.' | '"' | '\''))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Mathematics as text: only spacing is ignored.
fn structure_key(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

fn is_text_answer(normalized: &str) -> bool {
    // A word of three or more letters outside a command: "Monday", "even", "no solution".
    let stripped = normalized.replace("\\infty", "").replace("\\pi", "");
    let stripped = ENVIRONMENT.replace_all(&stripped, "");
    WORD.is_match(&stripped) && !stripped.contains("\\frac") && !stripped.contains("\\sqrt")
}

/// Compares two answers (not whole responses).
pub fn verify_answers(gold: &str, pred: &str, config: &VerifyConfig) -> Verdict {
    let verdict = |correct: bool, explanation: String| Verdict {
        correct,
        extracted: Some(pred.to_string()),
        source: None,
        explanation,
    };
    let g = normalize(gold);
    // "2,74" against a gold "2.74" is a decimal comma: the gold answer says it is one number.
    let p = match pred.trim().trim_matches('$').trim() {
        raw if DECIMAL_POINT.is_match(&g) && DECIMAL_COMMA.is_match(raw) => normalize(&raw.replace(',', ".")),
        _ => normalize(pred),
    };
    if g.is_empty() {
        return verdict(false, "the gold answer is empty".into());
    }
    if g == p {
        return verdict(true, format!("identical after normalisation: {g}"));
    }
    if let Some(gold_letter) = CHOICE.captures(&g) {
        let letter = gold_letter[1].to_uppercase();
        let found = PRED_CHOICE.captures(&p).map(|c| c[1].to_uppercase());
        return match found {
            Some(choice) if choice == letter => verdict(true, format!("choice {letter}")),
            Some(choice) => verdict(false, format!("choice {choice}, gold {letter}")),
            None => verdict(false, format!("no choice letter in the prediction (gold {letter})")),
        };
    }
    // Words compare leniently (markup, case, spacing and dots ignored); mathematics never does,
    // since dropping a brace or a dot changes the value (`2^{n+1}` / `2^n+1`, `10.5` / `105`).
    if is_text_answer(&g) {
        return if text_key(&g) == text_key(&p) {
            verdict(true, "equal as text (case and spacing ignored)".into())
        } else {
            verdict(false, format!("text answers differ: {g:?} vs {p:?}"))
        };
    }
    // Where parsing fails, only text that keeps every brace, dot and exponent may still match.
    let same_text = structure_key(&g) == structure_key(&p);
    let unparsed = |why: String| {
        if same_text { verdict(true, format!("equal as text with its structure kept ({why})")) } else { verdict(false, why) }
    };
    if g.len() > MAX_PARSED_LENGTH || p.len() > MAX_PARSED_LENGTH {
        return unparsed("too long to parse; the texts differ".into());
    }
    let gold_answer = match parse_answer(&g) {
        Ok(answer) => answer,
        Err(e) => return unparsed(format!("gold not parsed as math ({e})")),
    };
    let pred_answer = match parse_answer(&p) {
        Ok(answer) => answer,
        Err(e) => return unparsed(format!("prediction not parsed as math ({e})")),
    };
    let mut budget = Budget::new(config.max_steps, Instant::now() + config.time_budget);
    let mut comparer = Comparer { relative_tolerance: config.relative_tolerance, budget: &mut budget };
    match comparer.answers_equal(&gold_answer, &pred_answer) {
        Ok(true) => verdict(true, format!("equivalent as {}", shape(&gold_answer))),
        Ok(false) => verdict(false, format!("not equivalent as {}: {g} vs {p}", shape(&gold_answer))),
        Err(EvalError::Budget) => verdict(false, "budget exhausted before equivalence was shown".into()),
        Err(EvalError::Undefined(why)) => verdict(false, format!("cannot evaluate: {why}")),
    }
}

fn shape(answer: &Answer) -> &'static str {
    match answer {
        Answer::Expr(_) => "expressions",
        Answer::Tuple { .. } => "tuples/intervals",
        Answer::Set(_) => "sets",
        Answer::Relations(_) => "relations",
        Answer::Matrix(_) => "matrices",
    }
}

/// The gold answer of a reference: its last `\boxed{}` when it has one (a full solution),
/// else the whole string.
pub fn gold_answer(gold: &str) -> String {
    extract::boxed_contents(gold).last().map_or_else(|| gold.trim().to_string(), |b| b.trim().to_string())
}

/// Verifies a whole model response (or a bare answer) against a gold answer.
pub fn verify(gold: &str, response: &str, config: &VerifyConfig) -> Verdict {
    let gold = gold_answer(gold);
    let extracted = extract_answer(response, config.multiple_boxed, |a, b| verify_answers(a, b, config).correct);
    match extracted {
        None => Verdict {
            correct: false,
            extracted: None,
            source: None,
            explanation: "no answer found in the prediction".into(),
        },
        Some((answer, source)) => {
            let mut verdict = verify_answers(&gold, &answer, config);
            verdict.source = Some(source);
            verdict
        }
    }
}
