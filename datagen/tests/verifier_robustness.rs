//! The verifier ends on adversarial input by its step budget alone, and is safe to call from many
//! threads at once. Random input is in verifier_properties.rs; speed is `datagen bench verify`'s.

use std::time::Duration;

use datagen::verify::{Rule, VerifyConfig, verify};

/// Verifies with no effective time limit, so that only the step budget (and linear extraction)
/// can end the work: a hang fails the suite by its timeout, and no assertion reads a clock.
fn assert_ends(gold: &str, pred: &str, expected: Option<bool>) {
    let config = VerifyConfig { time_budget: Duration::from_secs(3600), ..VerifyConfig::default() };
    let verdict = verify(gold, pred, &config);
    if let Some(expected) = expected {
        assert_eq!(verdict.correct(), expected, "{:.60}: {}", pred, verdict.explanation);
    }
}

#[test]
fn adversarial_inputs_end_within_the_step_budget() {
    // Deep nesting.
    let deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
    assert_ends("1", &deep, None);
    assert_ends(&deep, &format!("\\boxed{{{deep}}}"), None);
    let braces = format!("\\boxed{{{}1{}}}", "{".repeat(50_000), "}".repeat(50_000));
    assert_ends("1", &braces, None);
    let fractions = "\\frac{".repeat(10_000) + "1" + &"}{2}".repeat(10_000);
    assert_ends("0", &fractions, None);
    // Unbalanced braces.
    assert_ends("1", &"\\boxed{".repeat(10_000), Some(false));
    assert_ends("1", &"}".repeat(100_000), Some(false));
    // A megabyte of text, with and without an answer at the end.
    let long = "The cat sat on the mat. ".repeat(45_000);
    assert!(long.len() > 1_000_000);
    assert_ends("7", &long, Some(false));
    assert_ends("7", &format!("{long}\\boxed{{7}}"), Some(true));
    assert_ends("7", &"1+".repeat(500_000), Some(false));
    // Huge exponents and factorials.
    assert_ends("1", "10^{10^{10^{10}}}", Some(false));
    assert_ends("2^{100000}", "2^{100000}", Some(true));
    assert_ends("2^{100000}", "2^{100001}", None);
    assert_ends("1", "99999!", Some(false));
    assert_ends("1", "(((x^{x})^{x})^{x})^{99999}", Some(false));
    // A tiny step budget is reported as such, not as a wrong answer.
    let tiny = VerifyConfig { max_steps: 5, time_budget: Duration::from_secs(3600), ..VerifyConfig::default() };
    let verdict = verify("x^2+2x+1", "(x+1)^2", &tiny);
    assert_eq!(verdict.rule, Rule::Budget, "{}", verdict.explanation);
}

#[test]
fn big_numbers_are_exact_or_refused_never_rounded_equal() {
    let config = VerifyConfig::default();
    let wrong = [
        ("2^{200}+1", "2^{200}"),
        (r"\frac{10^{40}+1}{10^{40}}", "1"),
        ("99999999999999999999999999999999999999999", "99999999999999999999999999999999999999998"),
        ("30!", "265252859812191058636308480000001"),
        ("40!", "815915283247897734345611269596115894272000000001"),
        (r"\pi \cdot 2^{2000}", r"\pi \cdot 2^{2001}"),
        ("e^{1000}", "e^{1001}"),
        ("2^{100000}", "2^{100001}"),
        ("1.00000000000000000000000000000000000000001", "1"),
    ];
    for (gold, pred) in wrong {
        let verdict = verify(gold, pred, &config);
        assert!(!verdict.correct(), "{gold} vs {pred}: {}", verdict.explanation);
    }
    let right = [
        ("2^{64}", "18446744073709551616"),
        ("40!", "815915283247897734345611269596115894272000000000"),
        ("2^{300}", r"2^{150}\cdot 2^{150}"),
        (r"\frac{10^{40}+1}{10^{40}}", "1.0000000000000000000000000000000000000001"),
    ];
    for (gold, pred) in right {
        let verdict = verify(gold, pred, &config);
        assert!(verdict.correct(), "{gold} vs {pred}: {}", verdict.explanation);
    }
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
                    assert_eq!(verify(gold, pred, config).correct(), *expected, "{gold} vs {pred}");
                }
            });
        }
    });
}
