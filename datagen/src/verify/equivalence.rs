//! Whether a predicted answer is the gold answer. The gold answer's shape drives the
//! comparison, so `verify(gold, pred)` is asymmetric where it must be (gold `5`, pred `x = 5`
//! is right; gold `x = 5`, pred `5` is right too; gold `{1, 2}`, pred `2, 1` is right).

use std::collections::{BTreeMap, BTreeSet};

use num_complex::Complex64;

use num_bigint::BigInt;
use num_traits::{One, Signed};

use super::evaluate::{Budget, EvalError, Rational, Value, evaluate, parse_decimal, plus_minus_count, to_f64, variables};
use super::ROUNDED_MIN_DIGITS;
use super::parse::{Answer, Constant, Expr, Relation};

/// Points at which expressions with free variables are compared: irrational-ish, distinct per
/// variable, and of both signs, so that `\sqrt{x^2}` is not taken for `x` (evaluation is
/// complex, so logs and roots of negatives stay defined on the principal branch).
const POINTS: [f64; 9] = [0.5772, -1.3247, 2.2361, -0.8862, 1.6180, 2.7183, -0.4142, 3.1416, 1.1892];
const POINT_TRIALS: usize = 6;

/// A left-hand side that names what the answer is: `x`, `u_n`, `f(x)`.
fn names_a_value(lhs: &Expr) -> bool {
    match lhs {
        Expr::Variable(_) => true,
        Expr::Mul(f, _) => matches!(**f, Expr::Variable(_)),
        _ => false,
    }
}

pub struct Comparer<'a> {
    pub relative_tolerance: f64,
    pub budget: &'a mut Budget,
}

fn values_close(a: &Value, b: &Value, tolerance: f64) -> bool {
    if let (Some(x), Some(y)) = (&a.exact, &b.exact) {
        return x == y;
    }
    let (x, y) = (a.approx, b.approx);
    if x.re.is_infinite() || y.re.is_infinite() {
        return x.re == y.re && x.im.abs() < 1e-12 && y.im.abs() < 1e-12;
    }
    if !(x.re.is_finite() && x.im.is_finite() && y.re.is_finite() && y.im.is_finite()) {
        return false;
    }
    let scale = 1.0f64.max(x.norm()).max(y.norm());
    (x - y).norm() <= tolerance * scale
}

impl Comparer<'_> {
    /// All values of an expression with its `±` expanded (at most 16).
    fn expanded_values(&mut self, expr: &Expr, vars: &BTreeMap<String, Complex64>) -> Result<Vec<Value>, EvalError> {
        let count = plus_minus_count(expr).min(4);
        let mut values = Vec::new();
        for mask in 0..(1u32 << count) {
            let mut index = 0;
            let mut choose = || {
                let minus = mask >> index & 1 == 1;
                index += 1;
                minus
            };
            values.push(evaluate(expr, vars, &mut choose, self.budget)?);
        }
        Ok(values)
    }

    fn value_sets_equal(&self, a: &[Value], b: &[Value]) -> bool {
        a.iter().all(|x| b.iter().any(|y| values_close(x, y, self.relative_tolerance)))
            && b.iter().all(|y| a.iter().any(|x| values_close(x, y, self.relative_tolerance)))
    }

    /// Numeric equality of two expressions: exactly when both are rational, else within the
    /// tolerance; with free variables, at several points.
    pub fn expressions_equal(&mut self, gold: &Expr, pred: &Expr) -> Result<bool, EvalError> {
        // The union of both sides' variables: `1` and `\sin^2 x + \cos^2 x` are equal.
        let mut names = BTreeSet::new();
        variables(gold, &mut names);
        variables(pred, &mut names);
        if names.is_empty() {
            let vars = BTreeMap::new();
            let (a, b) = (self.expanded_values(gold, &vars)?, self.expanded_values(pred, &vars)?);
            return Ok(self.value_sets_equal(&a, &b));
        }
        let mut agreeing = 0;
        for trial in 0..POINT_TRIALS {
            let vars: BTreeMap<String, Complex64> = names
                .iter()
                .enumerate()
                .map(|(k, name)| (name.clone(), Complex64::new(POINTS[(trial * 2 + k) % POINTS.len()], 0.0)))
                .collect();
            let (a, b) = match (self.expanded_values(gold, &vars), self.expanded_values(pred, &vars)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(EvalError::Budget), _) | (_, Err(EvalError::Budget)) => return Err(EvalError::Budget),
                // An overflow or a domain error at this point: try the next one.
                _ => continue,
            };
            if a.iter().chain(&b).any(|v| !v.approx.re.is_finite()) {
                continue;
            }
            if !self.value_sets_equal(&a, &b) {
                return Ok(false);
            }
            agreeing += 1;
        }
        Ok(agreeing >= 3)
    }

    /// Whether `decimal` (a plain decimal literal as written) is `gold`'s value rounded to the
    /// places it shows, with at least [`ROUNDED_MIN_DIGITS`] significant digits.
    pub fn rounds_to(&mut self, gold: &Expr, decimal: &str) -> Result<bool, EvalError> {
        let mut names = BTreeSet::new();
        variables(gold, &mut names);
        if !names.is_empty() || plus_minus_count(gold) > 0 {
            return Ok(false);
        }
        let places = decimal.split_once('.').map_or(0, |(_, fraction)| fraction.len());
        let significant = decimal.chars().filter(char::is_ascii_digit).skip_while(|&c| c == '0').count();
        let Some(shown) = parse_decimal(decimal) else { return Ok(false) };
        if places == 0 || places > 300 || significant < ROUNDED_MIN_DIGITS {
            return Ok(false);
        }
        let half = Rational::new(BigInt::one(), BigInt::from(2) * BigInt::from(10).pow(places as u32));
        let value = evaluate(gold, &BTreeMap::new(), &mut || false, self.budget)?;
        Ok(match value.exact {
            Some(exact) => (exact - &shown).abs() <= half,
            None => {
                let x = value.approx;
                x.re.is_finite() && x.im.abs() <= 1e-12 * x.norm().max(1.0) && (x.re - to_f64(&shown)).abs() <= to_f64(&half) * (1.0 + 1e-9)
            }
        })
    }

    /// `lhs op rhs` as `f op' 0` with `op'` one of `=`, `≠`, `<`, `≤` (sides swapped for `>`, `≥`).
    fn canonical(relation: &(Expr, Relation, Expr)) -> (Expr, Relation) {
        let (lhs, op, rhs) = relation;
        match op {
            Relation::Gt | Relation::Ge => (Expr::Sub(Box::new(rhs.clone()), Box::new(lhs.clone())), op.flipped()),
            _ => (Expr::Sub(Box::new(lhs.clone()), Box::new(rhs.clone())), *op),
        }
    }

    /// Two relations are equal when their canonical sides are proportional: by any non-zero
    /// factor for `=` and `≠`, by a positive one for inequalities.
    pub fn relations_equal(&mut self, gold: &(Expr, Relation, Expr), pred: &(Expr, Relation, Expr)) -> Result<bool, EvalError> {
        let (f, op) = Self::canonical(gold);
        let (g, pred_op) = Self::canonical(pred);
        if op != pred_op {
            return Ok(false);
        }
        let mut names = BTreeSet::new();
        variables(&f, &mut names);
        variables(&g, &mut names);
        let mut ratio: Option<f64> = None;
        let mut agreeing = 0;
        for trial in 0..POINT_TRIALS + 2 {
            let vars: BTreeMap<String, Complex64> = names
                .iter()
                .enumerate()
                .map(|(k, name)| (name.clone(), Complex64::new(POINTS[(trial * 2 + k) % POINTS.len()], 0.0)))
                .collect();
            let mut no_choice = || false;
            let (a, b) = match (evaluate(&f, &vars, &mut no_choice, self.budget), evaluate(&g, &vars, &mut || false, self.budget)) {
                (Ok(a), Ok(b)) => (a.approx, b.approx),
                (Err(EvalError::Budget), _) | (_, Err(EvalError::Budget)) => return Err(EvalError::Budget),
                _ => continue,
            };
            if !(a.re.is_finite() && b.re.is_finite()) {
                continue;
            }
            if a.norm() < 1e-12 && b.norm() < 1e-12 {
                agreeing += 1;
                continue;
            }
            if a.norm() < 1e-12 || b.norm() < 1e-12 {
                return Ok(false);
            }
            let r = a.re / b.re;
            match ratio {
                None => ratio = Some(r),
                Some(k) if (r - k).abs() <= self.relative_tolerance.max(1e-9) * k.abs().max(1.0) => {}
                Some(_) => return Ok(false),
            }
            agreeing += 1;
        }
        let sign_ok = match (op, ratio) {
            (Relation::Eq | Relation::Ne, Some(k)) => k != 0.0,
            (_, Some(k)) => k > 0.0,
            (_, None) => true,
        };
        Ok(agreeing >= 3 && sign_ok)
    }

    /// The gold answer's shape decides how `pred` is read.
    pub fn answers_equal(&mut self, gold: &Answer, pred: &Answer) -> Result<bool, EvalError> {
        match (gold, pred) {
            (Answer::Expr(g), Answer::Expr(p)) => self.expressions_equal(g, p),
            // gold 5, pred `x = 5`, or a chain `x = 2 \cdot 3 = 6` whose every member is the value.
            (Answer::Expr(g), Answer::Relations(relations)) => {
                let named = relations.first().is_some_and(|r| matches!(r.0, Expr::Variable(_)));
                if !named || relations.iter().any(|r| r.1 != Relation::Eq) {
                    return Ok(false);
                }
                for (_, _, rhs) in relations {
                    if !self.expressions_equal(g, rhs)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            // gold `1 \pm \sqrt{2}`, pred `1 + \sqrt{2}, 1 - \sqrt{2}`.
            (Answer::Expr(g), Answer::Set(items)) if plus_minus_count(g) > 0 => {
                let vars = BTreeMap::new();
                let gold_values = self.expanded_values(g, &vars)?;
                let mut pred_values = Vec::new();
                for item in items {
                    match item {
                        Answer::Expr(p) => pred_values.extend(self.expanded_values(p, &vars)?),
                        _ => return Ok(false),
                    }
                }
                Ok(self.value_sets_equal(&gold_values, &pred_values))
            }
            (Answer::Expr(_), Answer::Set(items)) if items.len() == 1 => self.answers_equal(gold, &items[0]),
            // gold `x = 5` or `f(x) = x^2 - 1`: a prediction of the value alone is right.
            (Answer::Relations(g), _) if g.len() == 1 && g[0].1 == Relation::Eq && names_a_value(&g[0].0) => {
                let (name, _, value) = &g[0];
                match pred {
                    Answer::Expr(p) => self.expressions_equal(value, p),
                    Answer::Relations(p) if p.len() == 1 => {
                        if p[0].1 == Relation::Eq && p[0].0 == *name {
                            self.expressions_equal(value, &p[0].2)
                        } else {
                            self.relations_equal(&g[0], &p[0])
                        }
                    }
                    _ => Ok(false),
                }
            }
            // gold `a = 1, b = 0`, pred `(1, 0)`: the values in the gold's order.
            (Answer::Set(g), Answer::Tuple { open: '(', close: ')', items })
                if g.len() == items.len()
                    && g.iter().all(|a| matches!(a, Answer::Relations(r) if r.len() == 1 && r[0].1 == Relation::Eq && matches!(r[0].0, Expr::Variable(_)))) =>
            {
                for (answer, item) in g.iter().zip(items) {
                    let Answer::Relations(r) = answer else { return Ok(false) };
                    if !self.expressions_equal(&r[0].2, item)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            (Answer::Relations(g), Answer::Relations(p)) => {
                if g.len() != p.len() {
                    return Ok(false);
                }
                for (a, b) in g.iter().zip(p) {
                    if !self.relations_equal(a, b)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            // An interval and the inequalities that define it: `(1, 3)` / `1 < x < 3`, `[0, \infty)` / `x \ge 0`.
            (Answer::Tuple { open, close, items }, Answer::Relations(p)) | (Answer::Relations(p), Answer::Tuple { open, close, items })
                if items.len() == 2 =>
            {
                self.interval_equals_relations(*open, *close, items, p)
            }
            // gold `(3, 2)`, pred `p = 3, q = 2`: the values in the prediction's order, each of its
            // own name (`x = 2, x = 5` is two roots, not a pair).
            (Answer::Tuple { open: '(', close: ')', items }, Answer::Set(p)) if items.len() == p.len() => {
                let names: BTreeSet<String> = p
                    .iter()
                    .filter_map(|a| match a {
                        Answer::Relations(r) if r.len() == 1 => match &r[0].0 {
                            Expr::Variable(name) => Some(name.clone()),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect();
                if names.len() != p.len() {
                    return Ok(false);
                }
                for (item, answer) in items.iter().zip(p) {
                    match answer {
                        Answer::Relations(r) if r.len() == 1 && r[0].1 == Relation::Eq && matches!(r[0].0, Expr::Variable(_)) => {
                            if !self.expressions_equal(item, &r[0].2)? {
                                return Ok(false);
                            }
                        }
                        _ => return Ok(false),
                    }
                }
                Ok(true)
            }
            (Answer::Tuple { open, close, items }, Answer::Tuple { open: o, close: c, items: p }) => {
                if open != o || close != c || items.len() != p.len() {
                    return Ok(false);
                }
                for (a, b) in items.iter().zip(p) {
                    if !self.expressions_equal(a, b)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            (Answer::Set(g), Answer::Set(p)) => self.multisets_equal(g, p),
            // gold `3, -3`, pred `\pm 3`.
            (Answer::Set(_), Answer::Expr(p)) if plus_minus_count(p) > 0 => self.answers_equal(pred, gold),
            (Answer::Set(g), single) if g.len() == 1 => self.answers_equal(&g[0], single),
            (Answer::Matrix(g), Answer::Matrix(p)) => {
                if g.len() != p.len() || g.iter().zip(p).any(|(a, b)| a.len() != b.len()) {
                    return Ok(false);
                }
                for (row_g, row_p) in g.iter().zip(p) {
                    for (a, b) in row_g.iter().zip(row_p) {
                        if !self.expressions_equal(a, b)? {
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether `relations` on one variable describe the interval `open items[0], items[1] close`.
    fn interval_equals_relations(&mut self, open: char, close: char, items: &[Expr], relations: &[(Expr, Relation, Expr)]) -> Result<bool, EvalError> {
        let infinite = |expr: &Expr, negative: bool| match expr {
            Expr::Constant(Constant::Infinity) => !negative,
            Expr::Neg(inner) => negative && matches!(**inner, Expr::Constant(Constant::Infinity)),
            _ => false,
        };
        match relations {
            [(low, op1, x1), (x2, op2, high)] => {
                let bracket = |op: Relation, left: bool| match (op, left) {
                    (Relation::Lt, true) => Some('('),
                    (Relation::Le, true) => Some('['),
                    (Relation::Lt, false) => Some(')'),
                    (Relation::Le, false) => Some(']'),
                    _ => None,
                };
                if x1 != x2 || !matches!(x1, Expr::Variable(_)) {
                    return Ok(false);
                }
                if bracket(*op1, true) != Some(open) || bracket(*op2, false) != Some(close) {
                    return Ok(false);
                }
                Ok(self.expressions_equal(&items[0], low)? && self.expressions_equal(&items[1], high)?)
            }
            [(lhs, op, rhs)] => {
                // `3 > x` reads as `x < 3`.
                let (bound, op) = match (lhs, rhs) {
                    (Expr::Variable(_), _) => (rhs, *op),
                    (_, Expr::Variable(_)) => (lhs, op.flipped()),
                    _ => return Ok(false),
                };
                let (finite, ok) = match op {
                    Relation::Lt => (&items[1], open == '(' && infinite(&items[0], true) && close == ')'),
                    Relation::Le => (&items[1], open == '(' && infinite(&items[0], true) && close == ']'),
                    Relation::Gt => (&items[0], open == '(' && infinite(&items[1], false) && close == ')'),
                    Relation::Ge => (&items[0], open == '[' && infinite(&items[1], false) && close == ')'),
                    Relation::Eq | Relation::Ne => return Ok(false),
                };
                Ok(ok && self.expressions_equal(finite, bound)?)
            }
            _ => Ok(false),
        }
    }

    /// Order-insensitive: every gold item matched by a distinct predicted item.
    fn multisets_equal(&mut self, gold: &[Answer], pred: &[Answer]) -> Result<bool, EvalError> {
        if gold.len() != pred.len() {
            return Ok(false);
        }
        let mut used = vec![false; pred.len()];
        for g in gold {
            let mut found = false;
            for (j, p) in pred.iter().enumerate() {
                if !used[j] && self.answers_equal(g, p)? {
                    used[j] = true;
                    found = true;
                    break;
                }
            }
            if !found {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
