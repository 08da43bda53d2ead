//! String-level clean-up of an extracted answer before it is parsed: the LaTeX that changes
//! how an answer looks but not what it is.

use std::sync::LazyLock;

use regex::Regex;

/// Words inside `\text{…}` (or bare at the end) that are units or filler, not the answer.
const UNIT_WORDS: &[&str] = &[
    "units", "unit", "square units", "sq units", "cm", "centimeters", "centimetres", "m", "meters", "metres", "km",
    "kilometers", "mm", "inches", "inch", "in", "feet", "foot", "ft", "yards", "yd", "miles", "mi", "degrees", "degree",
    "deg", "radians", "rad", "dollars", "dollar", "cents", "cent", "hours", "hour", "hrs", "minutes", "minute", "min",
    "seconds", "second", "sec", "s", "days", "day", "weeks", "week", "years", "year", "kg", "g", "grams", "gram",
    "kilograms", "pounds", "lbs", "ounces", "oz", "liters", "litres", "l", "ml", "mph", "people", "students", "apples",
    "cups", "pages", "points", "percent", "gallons", "gallon", "quarts", "pints", "feet^2", "sq", "cm^2", "m^2", "cm^3", "m^3", "square feet", "square inches",
    "square meters", "square centimeters", "cubic feet", "cubic inches", "cubic units", "times", "ways", "marbles", "years old",
];

static TEXT_COMMAND: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}(\^\{?[23]\}?)?").expect("static regex")
});
static THOUSANDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$").expect("static regex"));
static SPACED_THOUSANDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^-?\d{1,3}(?: \d{3})+(?:\.\d+)?$").expect("static regex"));
static REPEATING: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(\d*)\.(\d*)\\overline\{(\d+)\}").expect("static regex"));
static NAMED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:[A-Za-z]\s*=\s*|\([a-z](?:\s*,\s*[a-z])+\)\s*=\s*|[a-z]\s*\\in\s*)([(\[\\])").expect("static regex"));
/// `\left(\begin{array}{cc} … \end{array}\right)`: a matrix typeset as an array in brackets.
static ARRAY_MATRIX: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?s)^[(\[]\s*\\begin\{array\}\{[lcr|]*\}(.*)\\end\{array\}\s*[)\]]$").expect("static regex")
});
/// A label inside the answer: `\boxed{\text{Answer: } 14}`.
static ANSWER_LABEL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*:\s*").expect("static regex"));
/// A mixed number in plain text: `4 1/2`.
static PLAIN_MIXED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^(-?\d+)\s+(\d+)\s*/\s*(\d+)$").expect("static regex"));
static CHOOSE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\{([^{}]*)\\choose([^{}]*)\}").expect("static regex"));
/// Stands in for `\\` while spacing commands are removed.
const ROW_BREAK: &str = "\u{1}";
static THOUSANDS_BRACED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(\d),\{?\}?(\d{3})").expect("static regex"));
static SQRT_SHORT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\\sqrt\s*([0-9a-zA-Z])").expect("static regex"));
static FRAC_SHORT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])").expect("static regex"));
static FRAC_HALF_SHORT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\\frac\s*\{([^{}]*)\}\s*([0-9a-zA-Z])").expect("static regex"));
static QUALIFIER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:,\s*|\s+)(?:for|where|when)\s+[^,]*$").expect("static regex"));
static CONJUNCTION: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\s+(?:and|or)\s+").expect("static regex"));
static TRAILING_UNIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(.*?[0-9}])\s*([a-zA-Z][a-zA-Z ]*(?:\^[23])?)$").expect("static regex"));

/// Normalises an answer string. Never fails; returns the cleaned string.
pub fn normalize(answer: &str) -> String {
    let mut s = answer.trim().replace("\\$", "");
    // Math delimiters around the whole answer.
    for (open, close) in [("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)")] {
        if s.len() >= open.len() + close.len() && s.starts_with(open) && s.ends_with(close) {
            s = s[open.len()..s.len() - close.len()].trim().to_string();
        }
    }
    s = s.replace('$', "");
    // Inline math delimiters inside the answer (`\( x = 2 \) and \( x = -1 \)`).
    for delimiter in ["\\(", "\\)", "\\[", "\\]"] {
        s = s.replace(delimiter, " ");
    }
    // Unicode spellings.
    for (from, to) in [
        ("−", "-"), ("–", "-"), ("×", "\\times "), ("·", "\\cdot "), ("÷", "\\div "), ("√", "\\sqrt"), ("π", "\\pi "),
        ("∞", "\\infty "), ("≤", "\\le "), ("≥", "\\ge "), ("≠", "\\ne "), ("±", "\\pm "), ("∪", "\\cup "),
        ("°", ""), ("\u{a0}", " "),
    ] {
        s = s.replace(from, to);
    }
    // A matrix's row break `\\` must not lose a backslash to the spacing commands below (`\ `).
    s = s.replace("\\\\", ROW_BREAK);
    // Commands that only change the typesetting.
    for (from, to) in [
        ("\\leqslant", "\\le"), ("\\geqslant", "\\ge"), (">=", "\\ge "), ("<=", "\\le "),
        ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
        ("\\bigl", ""), ("\\bigr", ""), ("\\Bigl", ""), ("\\Bigr", ""), ("\\big", ""), ("\\Big", ""),
        ("\\displaystyle", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", " "), ("\\qquad", " "),
        ("\\quad", " "), ("~", " "), ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\%", ""), ("%", ""),
        ("\\$", ""), ("\\dots", "\\ldots"), ("\\cdots", "\\ldots"), ("\\leq", "\\le"), ("\\geq", "\\ge"),
        ("\\neq", "\\ne"), ("\\lt", "<"), ("\\gt", ">"), ("\\to", "\\rightarrow"), ("\\emptyset", "\\varnothing"),
    ] {
        s = s.replace(from, to);
    }
    s = s.replace(ROW_BREAK, "\\\\");
    // `\text{cm}` and other unit words disappear; other text keeps its words.
    for _ in 0..4 {
        let next = TEXT_COMMAND
            .replace_all(&s, |captures: &regex::Captures| {
                let inner = captures[1].trim();
                if UNIT_WORDS.contains(&inner.to_lowercase().as_str()) {
                    // `4\pi\text{ cm}^2`: the unit's power goes with it.
                    String::new()
                } else {
                    format!("{inner}{}", captures.get(2).map_or("", |m| m.as_str()))
                }
            })
            .into_owned();
        if next == s {
            break;
        }
        s = next;
    }
    s = SQRT_SHORT.replace_all(&s, "\\sqrt{$1}").into_owned();
    s = FRAC_SHORT.replace_all(&s, "\\frac{$1}{$2}").into_owned();
    s = FRAC_HALF_SHORT.replace_all(&s, "\\frac{$1}{$2}").into_owned();
    // Not `!`: after a number it is a factorial.
    s = s.trim().trim_end_matches(['.', ',', ';', ':']).trim().to_string();
    // `0.1\overline{6}` is exactly 15/90.
    s = REPEATING
        .replace_all(&s, |c: &regex::Captures| repeating_fraction(&c[1], &c[2], &c[3]).unwrap_or_else(|| c[0].to_string()))
        .into_owned();
    s = ARRAY_MATRIX.replace(&s, "\\begin{pmatrix}$1\\end{pmatrix}").into_owned();
    // TeX's `{n \choose k}`.
    s = CHOOSE.replace_all(&s, "\\binom{$1}{$2}").into_owned();
    // Braces around the whole answer group nothing: `{{2}}` is `2`.
    while let Some(inner) = s.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')).filter(|inner| balanced(inner)) {
        s = inner.trim().to_string();
    }
    // Bare unit words after a number: "12 cm", "5 apples".
    if let Some(captures) = TRAILING_UNIT.captures(&s) {
        if UNIT_WORDS.contains(&captures[2].trim().to_lowercase().as_str()) {
            s = captures[1].trim().to_string();
        }
    }
    // Thousands separators: "1,000,000", LaTeX's "1{,}000", and spaces ("10\ 080", "10 080").
    let compact: String = s.replace("{,}", ",").replace("\\,", "");
    if SPACED_THOUSANDS.is_match(&s) {
        s = s.replace(' ', "");
    } else if THOUSANDS.is_match(&compact) {
        s = compact.replace(',', "");
    } else if s.contains("{,}") {
        s = THOUSANDS_BRACED.replace_all(&s, "$1$2").into_owned();
    }
    // "t_n = 5t_{n-1} for n \ge 2": the qualifier is not part of the answer.
    s = QUALIFIER.replace(&s, "").into_owned();
    // A name for the answer that the gold does not write: `P = (8,-2)`, `(p,q) = (3,2)`, `x \in [1,2]`.
    s = NAMED.replace(&s, "$1").into_owned();
    s = ANSWER_LABEL.replace(&s, "").into_owned();
    // `-4 1/2` is −(4 + 1/2).
    s = PLAIN_MIXED
        .replace(&s, |c: &regex::Captures| match c[1].strip_prefix('-') {
            Some(whole) => format!("-({whole}\\frac{{{}}}{{{}}})", &c[2], &c[3]),
            None => format!("{}\\frac{{{}}}{{{}}}", &c[1], &c[2], &c[3]),
        })
        .into_owned();
    // The real line, as an interval.
    if matches!(s.as_str(), "\\mathbb{R}" | "\\mathbb R" | "\\R" | "\\Bbb{R}" | "\\Bbb R") {
        s = "(-\\infty,\\infty)".to_string();
    }
    // "x = 2 and x = -1", "3 or 4": lists of answers.
    if s.chars().any(|c| c.is_ascii_digit() || c == '\\') {
        s = CONJUNCTION.replace_all(&s, ", ").into_owned();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `int.fixed(repeat)…` as an exact fraction, or `None` past 18 digits.
fn repeating_fraction(int: &str, fixed: &str, repeat: &str) -> Option<String> {
    if int.len() > 18 || fixed.len() + repeat.len() > 18 {
        return None;
    }
    let number = |digits: &str| if digits.is_empty() { Some(0u128) } else { digits.parse::<u128>().ok() };
    let nines = 10u128.pow(repeat.len() as u32) - 1;
    let denominator = 10u128.pow(fixed.len() as u32).checked_mul(nines)?;
    let (int, fixed, repeat) = (number(int)?, number(fixed)?, number(repeat)?);
    let numerator = int.checked_mul(denominator)?.checked_add(fixed.checked_mul(nines)?)?.checked_add(repeat)?;
    Some(format!("\\frac{{{numerator}}}{{{denominator}}}"))
}

/// Whether every `}` in `s` closes a `{` of `s`, so that braces around `s` belong together.
fn balanced(s: &str) -> bool {
    let mut depth = 0usize;
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return false,
            '}' => depth -= 1,
            _ => {}
        }
    }
    depth == 0
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn cleans_typesetting() {
        assert_eq!(normalize(r"$\dfrac{1}{2}$"), r"\frac{1}{2}");
        assert_eq!(normalize(r"\left( 1, 2 \right)"), "( 1, 2 )");
        assert_eq!(normalize(r"30^\circ"), "30");
        assert_eq!(normalize(r"50\%"), "50");
        assert_eq!(normalize(r"\$1,234.50"), "1234.50");
        assert_eq!(normalize(r"12\text{ cm}"), "12");
        assert_eq!(normalize(r"12 cm"), "12");
        assert_eq!(normalize(r"\text{Monday}"), "Monday");
        assert_eq!(normalize(r"\sqrt3"), r"\sqrt{3}");
        assert_eq!(normalize(r"\frac12"), r"\frac{1}{2}");
        assert_eq!(normalize("5."), "5");
        assert_eq!(normalize("−3"), "-3");
        assert_eq!(normalize("1{,}000"), "1000");
        assert_eq!(normalize(r"10\ 080"), "10080");
        assert_eq!(normalize("1 000 000"), "1000000");
        assert_eq!(normalize("1 23"), "1 23");
        assert_eq!(normalize("{{{2}}}"), "2");
        assert_eq!(normalize("5!"), "5!");
        assert_eq!(normalize("P = (8,-2)"), "(8,-2)");
        assert_eq!(normalize("(p,q)=(3,2)"), "(3,2)");
        assert_eq!(normalize(r"x \in [-2,7]"), "[-2,7]");
        assert_eq!(normalize("x = 5"), "x = 5");
        assert_eq!(normalize("x >= 5"), r"x \ge 5");
        assert_eq!(normalize(r"0.1\overline{6}"), r"\frac{15}{90}");
        assert_eq!(normalize(r"\text{Answer: } 14"), "14");
        assert_eq!(normalize("4 1/2"), r"4\frac{1}{2}");
        assert_eq!(normalize("-4 1/2"), r"-(4\frac{1}{2})");
        assert_eq!(normalize(r"x \in \mathbb{R}"), r"(-\infty,\infty)");
        assert_eq!(normalize(r"-2.\overline{36}"), r"-\frac{234}{99}");
        assert_eq!(normalize(r"{5 \choose 2}"), r"\binom{5 }{ 2}");
        assert_eq!(normalize("{1}+{2}"), "{1}+{2}");
        assert_eq!(normalize(r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"), r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}");
        assert_eq!(normalize(r"\left(\begin{array}{cc} 1 & 2 \\ 3 & 4 \end{array}\right)"), r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}");
        assert_eq!(normalize(r"\begin{array}{cc} 1 & 2 \end{array}"), r"\begin{array}{cc} 1 & 2 \end{array}");
    }
}
