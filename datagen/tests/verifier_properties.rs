//! Property tests of the verifier (issue #11), on expressions generated at random:
//! - an expression is equivalent to itself after re-spacing, `\left`/`\right` and `\dfrac`
//!   rewrites, and a set to itself with its elements reordered;
//! - one changed digit, sign or brace is never judged equivalent unless the two values really are
//!   equal, which this file decides with its own evaluator, not the verifier's;
//! - no input panics, and every input finishes within the step budget alone (no wall clock).

use std::time::Duration;

use datagen::verify::{Outcome, VerifyConfig, verify};
use proptest::prelude::*;
use proptest::sample::select;

/// An expression whose value is real at every point: roots of non-negative values, denominators
/// that cannot vanish, integer exponents where the base can be negative.
#[derive(Debug, Clone)]
enum E {
    Int(u32),
    /// `whole.tenths`
    Decimal(u32, u32),
    X,
    Add(Box<E>, Box<E>),
    Sub(Box<E>, Box<E>),
    Mul(Box<E>, Box<E>),
    Neg(Box<E>),
    Frac(Box<E>, Box<E>),
    Pow(Box<E>, Box<E>),
    Sqrt(Box<E>),
}

use E::*;

fn b(e: E) -> Box<E> {
    Box::new(e)
}

fn value(e: &E, x: f64) -> f64 {
    match e {
        Int(n) => f64::from(*n),
        Decimal(w, t) => f64::from(*w) + f64::from(*t) / 10.0,
        X => x,
        Add(a, c) => value(a, x) + value(c, x),
        Sub(a, c) => value(a, x) - value(c, x),
        Mul(a, c) => value(a, x) * value(c, x),
        Neg(a) => -value(a, x),
        Frac(a, c) => value(a, x) / value(c, x),
        Pow(a, c) => value(a, x).powf(value(c, x)),
        Sqrt(a) => value(a, x).sqrt(),
    }
}

/// Points where the oracle compares values (not the verifier's own sample points).
const ORACLE_POINTS: [f64; 5] = [0.37, -1.9, 2.71, -0.55, 4.2];

fn same_values(a: &E, c: &E) -> bool {
    ORACLE_POINTS.iter().all(|&x| {
        let (u, v) = (value(a, x), value(c, x));
        !(u.is_finite() && v.is_finite()) || (u - v).abs() <= 1e-9 * u.abs().max(v.abs()).max(1.0)
    })
}

fn atom(e: &E) -> bool {
    matches!(e, Int(_) | Decimal(..) | X | Frac(..) | Sqrt(_))
}

/// Renders `e` as LaTeX tokens (joined with spacing chosen by the caller).
fn tokens(e: &E, out: &mut Vec<String>) {
    let paren = |e: &E, out: &mut Vec<String>, wrap: bool| {
        if wrap {
            out.push("(".into());
            tokens(e, out);
            out.push(")".into());
        } else {
            tokens(e, out);
        }
    };
    match e {
        Int(n) => out.push(n.to_string()),
        Decimal(w, t) => out.push(format!("{w}.{t}")),
        X => out.push("x".into()),
        Add(a, c) => {
            tokens(a, out);
            out.push("+".into());
            paren(c, out, matches!(**c, Neg(_)));
        }
        Sub(a, c) => {
            tokens(a, out);
            out.push("-".into());
            paren(c, out, matches!(**c, Add(..) | Sub(..) | Neg(_)));
        }
        Mul(a, c) => {
            paren(a, out, !atom(a) && !matches!(**a, Pow(..)));
            out.push("\\cdot".into());
            paren(c, out, !atom(c) && !matches!(**c, Pow(..)));
        }
        Neg(a) => {
            out.push("-".into());
            paren(a, out, !atom(a));
        }
        Frac(a, c) => {
            out.push("\\frac".into());
            braced(a, out);
            braced(c, out);
        }
        Pow(a, c) => {
            paren(a, out, !matches!(**a, Int(_) | X));
            out.push("^".into());
            braced(c, out);
        }
        Sqrt(a) => {
            out.push("\\sqrt".into());
            braced(a, out);
        }
    }
}

fn braced(e: &E, out: &mut Vec<String>) {
    out.push("{".into());
    tokens(e, out);
    out.push("}".into());
}

fn latex(e: &E) -> String {
    let mut out = Vec::new();
    tokens(e, &mut out);
    out.join(" ")
}

/// The same expression as another writer would type it: spacing between tokens, `\left(` /
/// `\right)`, `\dfrac`.
fn rewritten(e: &E, spacing: &[u8], left_right: bool, dfrac: bool) -> String {
    let mut out = Vec::new();
    tokens(e, &mut out);
    let mut text = String::new();
    for (i, token) in out.iter().enumerate() {
        let token = match token.as_str() {
            "(" if left_right => "\\left(",
            ")" if left_right => "\\right)",
            "\\frac" if dfrac => "\\dfrac",
            other => other,
        };
        text.push_str(token);
        // A command's name must not run into a following letter (`\cdot x`, not `\cdotx`).
        let needs_space = token.starts_with('\\') && out.get(i + 1).is_some_and(|t| t.starts_with(|c: char| c.is_ascii_alphabetic()));
        let spaces = spacing.get(i).copied().unwrap_or(0) % 3;
        text.push_str(&" ".repeat(usize::from(spaces).max(usize::from(needs_space))));
    }
    text
}

fn positive_denominator() -> impl Strategy<Value = E> {
    prop_oneof![(1u32..10).prop_map(Int), (1u32..4).prop_map(|k| Add(b(Pow(b(X), b(Int(2)))), b(Int(k))))]
}

fn exponent() -> impl Strategy<Value = E> {
    prop_oneof![(0u32..4).prop_map(Int), (0u32..3, 1u32..3).prop_map(|(p, q)| Add(b(Int(p)), b(Int(q))))]
}

fn expression() -> impl Strategy<Value = E> {
    let leaf = prop_oneof![(0u32..30).prop_map(Int), (0u32..10, 1u32..10).prop_map(|(w, t)| Decimal(w, t)), Just(X)];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, c)| Add(b(a), b(c))),
            (inner.clone(), inner.clone()).prop_map(|(a, c)| Sub(b(a), b(c))),
            (inner.clone(), inner.clone()).prop_map(|(a, c)| Mul(b(a), b(c))),
            inner.clone().prop_map(|a| Neg(b(a))),
            (inner.clone(), positive_denominator()).prop_map(|(a, c)| Frac(b(a), b(c))),
            (prop_oneof![(2u32..6).prop_map(Int), Just(X)], exponent()).prop_map(|(a, c)| Pow(b(a), b(c))),
            (2u32..6, exponent()).prop_map(|(a, c)| Pow(b(Int(a)), b(Add(b(X), b(c))))),
            (1u32..20).prop_map(|k| Sqrt(b(Add(b(Pow(b(X), b(Int(2)))), b(Int(k)))))),
            (2u32..50).prop_map(|k| Sqrt(b(Int(k)))),
        ]
    })
}

/// Every subtree position, in pre-order, with its path.
fn paths(e: &E, path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    out.push(path.clone());
    let children: Vec<&E> = match e {
        Add(a, c) | Sub(a, c) | Mul(a, c) | Frac(a, c) | Pow(a, c) => vec![a, c],
        Neg(a) | Sqrt(a) => vec![a],
        _ => vec![],
    };
    for (i, child) in children.into_iter().enumerate() {
        path.push(i);
        paths(child, path, out);
        path.pop();
    }
}

fn at_mut<'a>(e: &'a mut E, path: &[usize]) -> &'a mut E {
    let Some((&first, rest)) = path.split_first() else { return e };
    let child = match (e, first) {
        (Add(a, _) | Sub(a, _) | Mul(a, _) | Frac(a, _) | Pow(a, _) | Neg(a) | Sqrt(a), 0) => a,
        (Add(_, c) | Sub(_, c) | Mul(_, c) | Frac(_, c) | Pow(_, c), 1) => c,
        _ => unreachable!("paths() only yields existing children"),
    };
    at_mut(child, rest)
}

#[derive(Debug, Clone, Copy)]
enum Mutation {
    /// A number's digit changes.
    Digit(u32),
    /// A subtree is negated, or `+` and `-` trade places.
    Sign,
    /// A closing brace moves: `2^{n+1}` → `2^{n}+1`, `\sqrt{a+b}` → `\sqrt{a}+b`,
    /// `\frac{a+b}{c}` → `a+\frac{b}{c}`.
    Brace,
}

/// Applies `mutation` at the `pick`-th applicable place; `None` when there is none.
fn mutate(e: &E, mutation: Mutation, pick: usize) -> Option<E> {
    let mut all = Vec::new();
    paths(e, &mut Vec::new(), &mut all);
    let mut copy = e.clone();
    let applicable: Vec<Vec<usize>> = all
        .into_iter()
        .filter(|p| {
            let node = at_mut(&mut copy, p);
            match mutation {
                Mutation::Digit(_) => matches!(node, Int(_) | Decimal(..)),
                Mutation::Sign => true,
                Mutation::Brace => match node {
                    Pow(_, c) | Sqrt(c) | Frac(c, _) => matches!(**c, Add(..)),
                    _ => false,
                },
            }
        })
        .collect();
    let path = applicable.get(pick % applicable.len().max(1))?;
    let mut result = e.clone();
    let node = at_mut(&mut result, path);
    *node = match (mutation, node.clone()) {
        (Mutation::Digit(d), Int(n)) => Int(if n % 10 == d % 10 { n + 1 } else { n - n % 10 + d % 10 }),
        (Mutation::Digit(d), Decimal(w, t)) => Decimal(w, if t == d % 10 { (t + 1) % 10 } else { d % 10 }),
        (Mutation::Sign, Add(a, c)) => Sub(a, c),
        (Mutation::Sign, Sub(a, c)) => Add(a, c),
        (Mutation::Sign, Neg(a)) => *a,
        (Mutation::Sign, other) => Neg(b(other)),
        (Mutation::Brace, Pow(base, sum)) => match *sum {
            Add(p, q) => Add(b(Pow(base, p)), q),
            _ => unreachable!(),
        },
        (Mutation::Brace, Sqrt(sum)) => match *sum {
            Add(p, q) => Add(b(Sqrt(p)), q),
            _ => unreachable!(),
        },
        (Mutation::Brace, Frac(sum, d)) => match *sum {
            Add(p, q) => Add(p, b(Frac(q, d))),
            _ => unreachable!(),
        },
        _ => return None,
    };
    Some(result)
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![(0u32..10).prop_map(Mutation::Digit), Just(Mutation::Sign), Just(Mutation::Brace)]
}

/// Steps alone bound the work: with no effective time limit, every input must still finish.
fn steps_only() -> VerifyConfig {
    VerifyConfig { time_budget: Duration::from_secs(3600), ..VerifyConfig::default() }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn an_expression_is_itself_however_it_is_typeset(
        e in expression(),
        spacing in prop::collection::vec(any::<u8>(), 64),
        left_right in any::<bool>(),
        dfrac in any::<bool>(),
    ) {
        let (gold, pred) = (latex(&e), rewritten(&e, &spacing, left_right, dfrac));
        let verdict = verify(&gold, &format!("\\boxed{{{pred}}}"), &steps_only());
        prop_assert!(verdict.correct(), "{gold}  vs  {pred}: {}", verdict.explanation);
    }

    #[test]
    fn one_changed_digit_sign_or_brace_is_caught(e in expression(), mutation in mutation(), pick in any::<usize>()) {
        let Some(changed) = mutate(&e, mutation, pick) else { return Ok(()) };
        let (gold, pred) = (latex(&e), latex(&changed));
        let verdict = verify(&gold, &format!("The answer is $\\boxed{{{pred}}}$."), &steps_only());
        if verdict.correct() {
            prop_assert!(same_values(&e, &changed), "{mutation:?}: {gold}  judged equal to  {pred}: {}", verdict.explanation);
        }
    }

    #[test]
    fn a_set_is_itself_in_any_order(
        items in prop::collection::btree_set((1i32..40, 1u32..6), 2..6),
        shuffle in any::<usize>(),
        braces in any::<bool>(),
    ) {
        // Distinct values: a/b in lowest terms, kept only when their values differ.
        let mut values: Vec<(i32, u32)> = Vec::new();
        for (a, c) in items {
            if !values.iter().any(|&(p, q)| i64::from(p) * i64::from(c) == i64::from(a) * i64::from(q)) {
                values.push((a, c));
            }
        }
        prop_assume!(values.len() >= 2);
        let render = |(a, c): (i32, u32)| if c == 1 { a.to_string() } else { format!("\\frac{{{a}}}{{{c}}}") };
        let set = |items: &[(i32, u32)]| {
            let inner = items.iter().map(|&v| render(v)).collect::<Vec<_>>().join(", ");
            if braces { format!("\\{{{inner}\\}}") } else { inner }
        };
        let mut reordered = values.clone();
        let n = reordered.len();
        reordered.rotate_left(1 + shuffle % (n - 1));
        let (gold, pred) = (set(&values), set(&reordered));
        let verdict = verify(&gold, &format!("\\boxed{{{pred}}}"), &steps_only());
        prop_assert!(verdict.correct(), "{gold} vs {pred}: {}", verdict.explanation);
        // One element missing is a different set.
        let missing = set(&reordered[..n - 1]);
        let verdict = verify(&gold, &format!("\\boxed{{{missing}}}"), &steps_only());
        prop_assert!(!verdict.correct(), "{gold} vs {missing}: {}", verdict.explanation);
    }

    #[test]
    fn no_input_panics_and_the_step_budget_ends_every_input(
        gold in prop::collection::vec(select(PIECES), 0..40).prop_map(|p| p.concat()),
        pred in prop::collection::vec(select(PIECES), 0..40).prop_map(|p| p.concat()),
        text in any::<String>(),
    ) {
        let config = steps_only();
        for (g, p) in [(&gold, &pred), (&gold, &gold), (&text, &text), (&"1".to_string(), &text)] {
            let verdict = verify(g, p, &config);
            prop_assert!(!verdict.explanation.is_empty());
            prop_assert_eq!(verdict.outcome == Outcome::NoAnswer, verdict.extracted.is_none());
        }
    }
}

/// Pieces that real and broken answers are made of.
const PIECES: &[&str] = &[
    "\\boxed{", "\\frac", "\\sqrt", "{", "}", "(", ")", "[", "]", "\\{", "\\}", "^", "_", "1", "2.5", "0", "x", "y",
    "i", "e", "\\pi", "+", "-", "\\pm", "=", "<", "\\le", ",", "\\cup", "\\infty", "\\begin{pmatrix}", "&", "\\\\",
    "\\end{pmatrix}", "\\text{", "cm", "$", "\\left(", "\\right)", "</think>", "<think>", "|", "!", "\\log_", "\\sin",
    "10^{", "99999", "/", "\\cdot", " ", "\n", "é", "∞", "%", "\\$", "####", "Answer:", "\\dfrac", "#", "\\overline{",
    "\\binom", "\\lfloor", "\\rfloor", "\\begin{array}{cc}", "\\end{array}", "0,5", "\\,", "°", "The answer is ",
];
