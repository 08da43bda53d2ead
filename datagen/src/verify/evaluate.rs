//! Numeric evaluation of parsed expressions: exact rationals while the arithmetic stays
//! rational and fits, complex floating point otherwise, under a work budget.

use std::collections::BTreeMap;
use std::time::Instant;

use num_complex::Complex64;
use num_rational::Ratio;
use num_traits::{CheckedAdd, CheckedDiv, CheckedMul, CheckedSub, Signed, ToPrimitive, Zero};

use super::parse::{Constant, Expr};

pub type Rational = Ratio<i128>;

/// A value: exact when it can be, always with its complex approximation.
#[derive(Debug, Clone, Copy)]
pub struct Value {
    pub exact: Option<Rational>,
    pub approx: Complex64,
}

impl Value {
    fn exact(r: Rational) -> Value {
        Value { exact: Some(r), approx: Complex64::new(to_f64(r), 0.0) }
    }

    fn approx(c: Complex64) -> Value {
        Value { exact: None, approx: c }
    }
}

pub(crate) fn to_f64(r: Rational) -> f64 {
    r.numer().to_f64().unwrap_or(f64::NAN) / r.denom().to_f64().unwrap_or(f64::NAN)
}

/// Out of budget: the verdict is "not shown equal".
#[derive(Debug, Clone, PartialEq)]
pub enum EvalError {
    Budget,
    Undefined(String),
}

/// Work limit for one verification: a step count and a wall-clock deadline, checked as
/// evaluation goes (no signals, no threads).
#[derive(Debug, Clone)]
pub struct Budget {
    steps_left: u64,
    deadline: Instant,
}

impl Budget {
    pub fn new(steps: u64, deadline: Instant) -> Budget {
        Budget { steps_left: steps, deadline }
    }

    pub fn spend(&mut self) -> Result<(), EvalError> {
        if self.steps_left == 0 {
            return Err(EvalError::Budget);
        }
        self.steps_left -= 1;
        if self.steps_left % 256 == 0 && Instant::now() > self.deadline {
            self.steps_left = 0;
            return Err(EvalError::Budget);
        }
        Ok(())
    }
}

/// Parses a decimal literal ("12", "0.25", "1.5e-3") exactly.
pub fn parse_decimal(text: &str) -> Option<Rational> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.len() + fraction.len() > 30 {
        return None;
    }
    let digits: i128 = format!("{whole}{fraction}").parse().ok()?;
    let mut value = Rational::new(digits, 10i128.checked_pow(fraction.len() as u32)?);
    if exponent != 0 {
        let power = Rational::from_integer(10i128.checked_pow(exponent.unsigned_abs())?);
        value = if exponent > 0 { value.checked_mul(&power)? } else { value.checked_div(&power)? };
    }
    Some(value)
}

fn factorial(n: u32) -> Option<i128> {
    (1..=n as i128).try_fold(1i128, |acc, k| acc.checked_mul(k))
}

fn gamma_factorial(x: f64) -> f64 {
    // Only small non-negative integers reach here in practice; others are left undefined.
    if x >= 0.0 && x.fract() == 0.0 && x <= 170.0 { (1..=x as u64).map(|k| k as f64).product() } else { f64::NAN }
}

/// Evaluates `expr` with `variables` bound; `choose_minus` picks the `−` branch of each `±`.
pub fn evaluate(
    expr: &Expr,
    variables: &BTreeMap<String, Complex64>,
    choose_minus: &mut dyn FnMut() -> bool,
    budget: &mut Budget,
) -> Result<Value, EvalError> {
    budget.spend()?;
    let mut eval = |e: &Expr, budget: &mut Budget| evaluate(e, variables, choose_minus, budget);
    Ok(match expr {
        Expr::Number(text) => match parse_decimal(text) {
            Some(r) => Value::exact(r),
            None => Value::approx(Complex64::new(text.parse::<f64>().map_err(|_| EvalError::Undefined(text.clone()))?, 0.0)),
        },
        Expr::Variable(name) => match variables.get(name) {
            Some(value) => Value::approx(*value),
            None => return Err(EvalError::Undefined(format!("free variable {name}"))),
        },
        Expr::Constant(Constant::Pi) => Value::approx(Complex64::new(std::f64::consts::PI, 0.0)),
        Expr::Constant(Constant::E) => Value::approx(Complex64::new(std::f64::consts::E, 0.0)),
        Expr::Constant(Constant::I) => Value::approx(Complex64::new(0.0, 1.0)),
        Expr::Constant(Constant::Infinity) => Value::approx(Complex64::new(f64::INFINITY, 0.0)),
        Expr::Neg(a) => {
            let a = eval(a, budget)?;
            Value { exact: a.exact.map(|r| -r), approx: -a.approx }
        }
        Expr::Add(a, b) | Expr::Sub(a, b) | Expr::PlusMinus(a, b) => {
            let (a, b) = (eval(a, budget)?, eval(b, budget)?);
            let minus = match expr {
                Expr::Sub(..) => true,
                Expr::PlusMinus(..) => choose_minus(),
                _ => false,
            };
            let exact = match (a.exact, b.exact) {
                (Some(x), Some(y)) => if minus { x.checked_sub(&y) } else { x.checked_add(&y) },
                _ => None,
            };
            let approx = if minus { a.approx - b.approx } else { a.approx + b.approx };
            Value { exact, approx }
        }
        Expr::Mul(a, b) => {
            let (a, b) = (eval(a, budget)?, eval(b, budget)?);
            let exact = match (a.exact, b.exact) {
                (Some(x), Some(y)) => x.checked_mul(&y),
                _ => None,
            };
            Value { exact, approx: a.approx * b.approx }
        }
        Expr::Div(a, b) => {
            let (a, b) = (eval(a, budget)?, eval(b, budget)?);
            if b.exact.is_some_and(|r| r.is_zero()) || b.approx.norm() == 0.0 {
                return Err(EvalError::Undefined("division by zero".into()));
            }
            let exact = match (a.exact, b.exact) {
                (Some(x), Some(y)) => x.checked_div(&y),
                _ => None,
            };
            Value { exact, approx: a.approx / b.approx }
        }
        Expr::Pow(a, b) => {
            let (base, exponent) = (eval(a, budget)?, eval(b, budget)?);
            let exact = match (base.exact, exponent.exact) {
                (Some(x), Some(n)) if n.is_integer() && n.numer().abs() <= 256 => {
                    let k = *n.numer() as i32;
                    if x.is_zero() && k < 0 {
                        None
                    } else {
                        let magnitude = k.unsigned_abs();
                        let mut acc = Some(Rational::from_integer(1));
                        for _ in 0..magnitude {
                            budget.spend()?;
                            acc = acc.and_then(|v| v.checked_mul(&x));
                        }
                        if k < 0 { acc.and_then(|v| Rational::from_integer(1).checked_div(&v)) } else { acc }
                    }
                }
                _ => None,
            };
            let approx = if base.approx.im == 0.0 && exponent.approx.im == 0.0 && base.approx.re >= 0.0 {
                Complex64::new(base.approx.re.powf(exponent.approx.re), 0.0)
            } else if base.approx.im == 0.0 && exponent.approx.im == 0.0 && exponent.approx.re.fract() == 0.0 {
                Complex64::new(base.approx.re.powf(exponent.approx.re), 0.0)
            } else {
                base.approx.powc(exponent.approx)
            };
            Value { exact, approx }
        }
        Expr::Root(index, radicand) => {
            let (n, x) = (eval(index, budget)?, eval(radicand, budget)?);
            let exact = match (n.exact, x.exact) {
                (Some(n), Some(x)) if n == Rational::from_integer(2) && !x.is_negative() => {
                    exact_sqrt(*x.numer()).zip(exact_sqrt(*x.denom())).map(|(a, b)| Rational::new(a, b))
                }
                _ => None,
            };
            let approx = if x.approx.im == 0.0 && x.approx.re >= 0.0 {
                Complex64::new(x.approx.re.powf(1.0 / n.approx.re), 0.0)
            } else if x.approx.im == 0.0 && n.approx.re % 2.0 == 1.0 {
                // Odd roots of negative reals are real.
                Complex64::new(-(-x.approx.re).powf(1.0 / n.approx.re), 0.0)
            } else {
                // `-(1 + 0i)` is `-1 - 0i`, whose principal root would be `-i`: drop the sign of zero.
                let imaginary = if x.approx.im == 0.0 { 0.0 } else { x.approx.im };
                Complex64::new(x.approx.re, imaginary).powf(1.0 / n.approx.re)
            };
            Value { exact, approx }
        }
        Expr::Factorial(a) => {
            let a = eval(a, budget)?;
            match a.exact {
                Some(n) if n.is_integer() && !n.is_negative() && *n.numer() <= 33 => {
                    Value::exact(Rational::from_integer(factorial(*n.numer() as u32).unwrap_or(0)))
                }
                _ => Value::approx(Complex64::new(gamma_factorial(a.approx.re), 0.0)),
            }
        }
        Expr::Abs(a) => {
            let a = eval(a, budget)?;
            Value { exact: a.exact.map(|r| r.abs()), approx: Complex64::new(a.approx.norm(), 0.0) }
        }
        Expr::Log(base, x) => {
            let (base, x) = (eval(base, budget)?, eval(x, budget)?);
            Value::approx(x.approx.ln() / base.approx.ln())
        }
        Expr::Function(name, a) if name == "floor" || name == "ceil" => {
            let a = eval(a, budget)?;
            let floor = name == "floor";
            match a.exact {
                Some(r) => Value::exact(if floor { r.floor() } else { r.ceil() }),
                None => Value::approx(Complex64::new(if floor { a.approx.re.floor() } else { a.approx.re.ceil() }, 0.0)),
            }
        }
        Expr::Function(name, a) => {
            let x = eval(a, budget)?.approx;
            Value::approx(match name.as_str() {
                "sin" => x.sin(),
                "cos" => x.cos(),
                "tan" => x.tan(),
                "cot" => x.cos() / x.sin(),
                "sec" => 1.0 / x.cos(),
                "csc" => 1.0 / x.sin(),
                "arcsin" => x.asin(),
                "arccos" => x.acos(),
                "arctan" => x.atan(),
                "sinh" => x.sinh(),
                "cosh" => x.cosh(),
                "tanh" => x.tanh(),
                "ln" => x.ln(),
                "log" => x.ln() / std::f64::consts::LN_10,
                "exp" => x.exp(),
                other => return Err(EvalError::Undefined(format!("function {other}"))),
            })
        }
    })
}

fn exact_sqrt(n: i128) -> Option<i128> {
    if n < 0 {
        return None;
    }
    let root = (n as f64).sqrt().round() as i128;
    (root.checked_mul(root) == Some(n)).then_some(root)
}

/// Free variables of an expression, sorted.
pub fn variables(expr: &Expr, into: &mut std::collections::BTreeSet<String>) {
    match expr {
        Expr::Variable(name) => {
            into.insert(name.clone());
        }
        Expr::Number(_) | Expr::Constant(_) => {}
        Expr::Neg(a) | Expr::Factorial(a) | Expr::Abs(a) | Expr::Function(_, a) => variables(a, into),
        Expr::Add(a, b)
        | Expr::Sub(a, b)
        | Expr::Mul(a, b)
        | Expr::Div(a, b)
        | Expr::Pow(a, b)
        | Expr::PlusMinus(a, b)
        | Expr::Log(a, b)
        | Expr::Root(a, b) => {
            variables(a, into);
            variables(b, into);
        }
    }
}

/// How many `±` an expression has.
pub fn plus_minus_count(expr: &Expr) -> usize {
    match expr {
        Expr::PlusMinus(a, b) => 1 + plus_minus_count(a) + plus_minus_count(b),
        Expr::Number(_) | Expr::Variable(_) | Expr::Constant(_) => 0,
        Expr::Neg(a) | Expr::Factorial(a) | Expr::Abs(a) | Expr::Function(_, a) => plus_minus_count(a),
        Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) | Expr::Pow(a, b) | Expr::Log(a, b) | Expr::Root(a, b) => {
            plus_minus_count(a) + plus_minus_count(b)
        }
    }
}
