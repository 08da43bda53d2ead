//! The verifier never panics, stays within its budget on adversarial input, and is safe to
//! call from many threads at once.

use std::time::{Duration, Instant};

use datagen::verify::{VerifyConfig, verify};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Pieces that real and broken answers are made of.
const PIECES: &[&str] = &[
    "\\boxed{", "\\frac", "\\sqrt", "{", "}", "(", ")", "[", "]", "\\{", "\\}", "^", "_", "1", "2.5", "0", "x", "y",
    "i", "e", "\\pi", "+", "-", "\\pm", "=", "<", "\\le", ",", "\\cup", "\\infty", "\\begin{pmatrix}", "&", "\\\\",
    "\\end{pmatrix}", "\\text{", "cm", "$", "\\left(", "\\right)", "</think>", "<think>", "|", "!", "\\log_", "\\sin",
    "10^{", "99999", "/", "\\cdot", " ", "\n", "é", "∞", "%", "\\$", "####", "Answer:", "\\dfrac", "#",
];

fn random_answer(rng: &mut StdRng) -> String {
    let count = rng.random_range(0..40);
    (0..count).map(|_| PIECES[rng.random_range(0..PIECES.len())]).collect()
}

#[test]
fn random_and_broken_inputs_never_panic() {
    let config = VerifyConfig::default();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..5_000 {
        let (gold, pred) = (random_answer(&mut rng), random_answer(&mut rng));
        let verdict = verify(&gold, &pred, &config);
        assert!(!verdict.explanation.is_empty());
        // A pair is always equal to itself or at least not a crash.
        let _ = verify(&gold, &gold, &config);
    }
    // Arbitrary unicode too.
    for _ in 0..2_000 {
        let text: String = (0..rng.random_range(0..30)).map(|_| char::from_u32(rng.random_range(0..0x3000)).unwrap_or('?')).collect();
        let _ = verify(&text, &text, &config);
        let _ = verify("1", &text, &config);
    }
}

fn assert_fast(gold: &str, pred: &str, expected: Option<bool>) {
    let config = VerifyConfig::default();
    let started = Instant::now();
    let verdict = verify(gold, pred, &config);
    let elapsed = started.elapsed();
    // The budget is 200 ms of evaluation; extraction of a megabyte is linear on top.
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?} on {:.60}…", pred);
    if let Some(expected) = expected {
        assert_eq!(verdict.correct, expected, "{:.60}: {}", pred, verdict.explanation);
    }
}

#[test]
fn adversarial_inputs_finish_within_budget() {
    // Deep nesting.
    let deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
    assert_fast("1", &deep, None);
    assert_fast(&deep, &format!("\\boxed{{{deep}}}"), None);
    let braces = format!("\\boxed{{{}1{}}}", "{".repeat(50_000), "}".repeat(50_000));
    assert_fast("1", &braces, None);
    let fractions = "\\frac{".repeat(10_000) + "1" + &"}{2}".repeat(10_000);
    assert_fast("0", &fractions, None);
    // Unbalanced braces.
    assert_fast("1", &"\\boxed{".repeat(10_000), Some(false));
    assert_fast("1", &"}".repeat(100_000), Some(false));
    // A megabyte of text, with and without an answer at the end.
    let long = "The cat sat on the mat. ".repeat(45_000);
    assert!(long.len() > 1_000_000);
    assert_fast("7", &long, Some(false));
    assert_fast("7", &format!("{long}\\boxed{{7}}"), Some(true));
    assert_fast("7", &"1+".repeat(500_000), Some(false));
    // Huge exponents and factorials.
    assert_fast("1", "10^{10^{10^{10}}}", Some(false));
    assert_fast("2^{100000}", "2^{100000}", Some(true));
    assert_fast("2^{100000}", "2^{100001}", None);
    assert_fast("1", "99999!", Some(false));
    assert_fast("1", "(((x^{x})^{x})^{x})^{99999}", Some(false));
}

#[test]
fn thread_safe_under_concurrent_use() {
    let pairs: Vec<(String, String, bool)> = vec![
        ("\\frac{1}{2}".into(), "0.5".into(), true),
        ("(1,3)".into(), "1<x<3".into(), true),
        ("x^2+2x+1".into(), "(x+1)^2".into(), true),
        ("\\{1,2\\}".into(), "\\{1,3\\}".into(), false),
        ("3+4i".into(), "4i+3".into(), true),
    ];
    let config = VerifyConfig::default();
    std::thread::scope(|scope| {
        for worker in 0..8 {
            let (pairs, config) = (&pairs, &config);
            scope.spawn(move || {
                for round in 0..500 {
                    let (gold, pred, expected) = &pairs[(worker + round) % pairs.len()];
                    assert_eq!(verify(gold, pred, config).correct, *expected, "{gold} vs {pred}");
                }
            });
        }
    });
}
