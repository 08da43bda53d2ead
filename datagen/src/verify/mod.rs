//! The math answer verifier: extraction, normalisation and equivalence of final answers.
//!
//! Pure and thread-safe (no global mutable state, no signals); every call runs under a step
//! and time budget and never panics, whatever the input.

pub mod equivalence;
pub mod evaluate;
pub mod extract;
pub mod normalize;
pub mod parse;

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use regex::Regex;
use serde::Serialize;

pub use extract::{MultipleBoxed, Source, extract_answer};

use equivalence::Comparer;
use evaluate::{Budget, EvalError};
use normalize::normalize;
use parse::{Answer, parse_answer};

/// How a decimal prediction of a value it cannot write exactly is judged (`0.333` for `\frac13`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Decimals {
    /// A decimal must be the value: exactly for a rational gold, within `relative_tolerance`
    /// otherwise. `0.333` is not `\frac13`; `0.5` is `\frac12`.
    #[default]
    Exact,
    /// Also accept a decimal that is the gold value rounded to the places it shows, when it shows
    /// at least three significant digits: `0.333` and `0.3333` for `\frac13`, `3.14` for `\pi`;
    /// never a truncation (`0.666` for `\frac23`) or a short one (`0.3`).
    Rounded,
}

/// Significant digits a rounded decimal must show under [`Decimals::Rounded`].
pub const ROUNDED_MIN_DIGITS: usize = 3;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VerifyConfig {
    pub multiple_boxed: MultipleBoxed,
    #[serde(default)]
    pub decimals: Decimals,
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
            decimals: Decimals::Exact,
            relative_tolerance: 1e-10,
            max_steps: 200_000,
            time_budget: Duration::from_millis(200),
        }
    }
}

/// The class of a verdict. Only `Correct` is accepted by rejection sampling; the others say why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Correct,
    /// An answer was found and read, and it is not the gold answer.
    Wrong,
    /// Nothing in the response is an answer (no box, answer sentence, math or short bare answer).
    NoAnswer,
    /// An answer was found but it, or the gold answer, could not be read as math (or the
    /// comparison ran out of budget or met a value too large to hold), and the texts differ.
    Unparsable,
}

impl Outcome {
    pub fn from_name(name: &str) -> Option<Outcome> {
        [Outcome::Correct, Outcome::Wrong, Outcome::NoAnswer, Outcome::Unparsable].into_iter().find(|o| o.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Correct => "correct",
            Outcome::Wrong => "wrong",
            Outcome::NoAnswer => "no_answer",
            Outcome::Unparsable => "unparsable",
        }
    }
}

/// The rule that decided a verdict (`datagen verify --explain`), in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Nothing was extracted from the response.
    NoAnswer,
    /// The reference answer is empty.
    EmptyGold,
    /// The two answers are the same string after normalisation.
    Normalized,
    /// The gold answer is a choice letter; the prediction's letter decides.
    ChoiceLetter,
    /// The gold answer is words: compared as text, ignoring case, spacing and markup.
    Text,
    /// One side is not parsable math; only text equal with its structure kept may match.
    StructureText,
    /// Compared as values: numbers exactly or within the tolerance, expressions at sample points,
    /// sets unordered, tuples in order, relations up to a factor, intervals against inequalities.
    Equivalence,
    /// A decimal that rounds the gold value ([`Decimals::Rounded`]).
    RoundedDecimal,
    /// The comparison ran out of steps or time.
    Budget,
    /// An expression has no value (division by zero, a domain error).
    Undefined,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::NoAnswer => "no_answer",
            Rule::EmptyGold => "empty_gold",
            Rule::Normalized => "normalized",
            Rule::ChoiceLetter => "choice_letter",
            Rule::Text => "text",
            Rule::StructureText => "structure_text",
            Rule::Equivalence => "equivalence",
            Rule::RoundedDecimal => "rounded_decimal",
            Rule::Budget => "budget",
            Rule::Undefined => "undefined",
        }
    }
}

/// The verdict on one (gold, prediction) pair.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub outcome: Outcome,
    /// The rule that decided.
    pub rule: Rule,
    /// The answer found in the prediction, as written.
    pub extracted: Option<String>,
    /// Where it was found.
    pub source: Option<Source>,
    /// Why the pair matched or not, with the values compared.
    pub explanation: String,
}

impl Verdict {
    pub fn correct(&self) -> bool {
        self.outcome == Outcome::Correct
    }
}

/// Answers longer than this are compared as text only: no real final answer is that long,
/// and parsing it would only spend the budget.
const MAX_PARSED_LENGTH: usize = 2_000;

static CHOICE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\(?([A-Ea-e])\)?$").expect("static regex"));
static PRED_CHOICE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:\\text\{)?\(?([A-Ea-e])\)?(?:$|[\s.:)}])").expect("static regex"));
/// Choices in parentheses: `(A) and (B)`, `(A) is false; (C)`.
static CHOICES_NAMED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\(([A-Ea-e])\)").expect("static regex"));
/// Bare letters listed: `A, C`, `A and C`, `A C`, `A/C`.
static CHOICE_LIST: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\(?[A-E]\)?(?:\s*(?:,|;|/|&|\band\b|\bor\b|\s)\s*\(?[A-E]\)?)+\.?$").expect("static regex"));
/// An AMC gold answer: the letter and its value, `\textbf{(C)}\ 15` → `(C) 15`.
static CHOICE_WITH_VALUE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\(([A-E])\)\s*(.+)$").expect("static regex"));
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
    let verdict = |outcome: Outcome, rule: Rule, explanation: String| Verdict {
        outcome,
        rule,
        extracted: Some(pred.to_string()),
        source: None,
        explanation,
    };
    let decided = |correct: bool, rule: Rule, explanation: String| {
        verdict(if correct { Outcome::Correct } else { Outcome::Wrong }, rule, explanation)
    };
    let g = normalize(gold);
    // "2,74" against a gold "2.74" is a decimal comma: the gold answer says it is one number.
    let p = match pred.trim().trim_matches('$').trim() {
        raw if DECIMAL_POINT.is_match(&g) && DECIMAL_COMMA.is_match(raw) => normalize(&raw.replace(',', ".")),
        _ => normalize(pred),
    };
    if g.is_empty() {
        return verdict(Outcome::Unparsable, Rule::EmptyGold, "the gold answer is empty".into());
    }
    if g == p {
        return decided(true, Rule::Normalized, format!("identical after normalisation: {g}"));
    }
    let gold_choice = CHOICE.captures(&g).map(|c| (c[1].to_uppercase(), None));
    let gold_choice = gold_choice.or_else(|| CHOICE_WITH_VALUE.captures(&g).map(|c| (c[1].to_string(), Some(c[2].to_string()))));
    if let Some((letter, value)) = gold_choice {
        let mut named: BTreeSet<String> = CHOICES_NAMED.captures_iter(&p).map(|c| c[1].to_uppercase()).collect();
        if CHOICE_LIST.is_match(p.trim()) {
            named.extend(p.chars().filter(|c| ('A'..='E').contains(c)).map(String::from));
        }
        let found = PRED_CHOICE.captures(&p).map(|c| c[1].to_uppercase());
        return match (found, value) {
            // "(A) and (B)", "(A) is false; (C)": naming several choices answers none of them.
            (Some(_), _) if named.len() > 1 => {
                decided(false, Rule::ChoiceLetter, format!("several choices named ({}), gold {letter}", named.into_iter().collect::<Vec<_>>().join(", ")))
            }
            (Some(choice), _) => decided(choice == letter, Rule::ChoiceLetter, format!("choice {choice}, gold {letter}")),
            // An AMC gold `(C) 15` also accepts its value alone.
            (None, Some(value)) => verify_answers(&value, pred, config),
            (None, None) => decided(false, Rule::ChoiceLetter, format!("no choice letter in the prediction (gold {letter})")),
        };
    }
    // Words compare leniently (markup, case, spacing and dots ignored); mathematics never does,
    // since dropping a brace or a dot changes the value (`2^{n+1}` / `2^n+1`, `10.5` / `105`).
    if is_text_answer(&g) {
        let same = text_key(&g) == text_key(&p);
        let why = if same { "equal as text (case and spacing ignored)".into() } else { format!("text answers differ: {g:?} vs {p:?}") };
        return decided(same, Rule::Text, why);
    }
    // Where parsing fails, only text that keeps every brace, dot and exponent may still match.
    let unparsed = |why: String| {
        if structure_key(&g) == structure_key(&p) {
            decided(true, Rule::StructureText, format!("equal as text with its structure kept ({why})"))
        } else {
            verdict(Outcome::Unparsable, Rule::StructureText, why)
        }
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
    let equal = comparer.answers_equal(&gold_answer, &pred_answer);
    if config.decimals == Decimals::Rounded && matches!(equal, Ok(false)) && DECIMAL_POINT.is_match(&p) {
        if let Answer::Expr(gold_expr) = &gold_answer {
            if comparer.rounds_to(gold_expr, &p).unwrap_or(false) {
                return decided(true, Rule::RoundedDecimal, format!("{p} is {g} rounded to the places shown"));
            }
        }
    }
    match equal {
        Ok(true) => decided(true, Rule::Equivalence, format!("equivalent as {}", shape(&gold_answer))),
        Ok(false) => decided(false, Rule::Equivalence, format!("not equivalent as {}: {g} vs {p}", shape(&gold_answer))),
        Err(EvalError::Budget) => verdict(Outcome::Unparsable, Rule::Budget, "budget exhausted before equivalence was shown".into()),
        Err(EvalError::Overflow) => verdict(Outcome::Unparsable, Rule::Budget, "a value too large to compare exactly".into()),
        Err(EvalError::Undefined(why)) => decided(false, Rule::Undefined, format!("cannot evaluate: {why}")),
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
    let extracted = extract_answer(response, config.multiple_boxed, |a, b| verify_answers(a, b, config).correct());
    match extracted {
        None => Verdict {
            outcome: Outcome::NoAnswer,
            rule: Rule::NoAnswer,
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
