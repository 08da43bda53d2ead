//! Numeric evaluation of parsed expressions: exact (arbitrary-precision) rationals while the
//! arithmetic stays rational, complex floating point otherwise, under a work budget.
//!
//! A rational too large to hold exactly, or a float that overflows, is never rounded into a value
//! that could compare equal to a neighbour (`2^{200}` against `2^{200}+1`, `40!` against its
//! digits plus one): evaluation stops with [`EvalError::Overflow`] instead.

use std::collections::BTreeMap;
use std::time::Instant;

use num_bigint::BigInt;
use num_complex::Complex64;
use num_traits::{One, Signed, ToPrimitive, Zero};

use super::parse::{Constant, Expr};

pub type Rational = num_rational::BigRational;

/// Bits of numerator plus denominator beyond which an exact value is not kept (a 19,700-digit
/// number): no final answer is that long, and arithmetic on it would only spend the budget.
const MAX_EXACT_BITS: u64 = 1 << 16;
/// The largest `n` whose `n!` is computed exactly (2,000! has 19,000 digits).
const MAX_EXACT_FACTORIAL: u32 = 2_000;

/// A value: exact when it can be, always with its complex approximation.
#[derive(Debug, Clone)]
pub struct Value {
    pub exact: Option<Rational>,
    pub approx: Complex64,
}

impl Value {
    fn exact(r: Rational) -> Result<Value, EvalError> {
        if r.numer().bits() + r.denom().bits() > MAX_EXACT_BITS {
            return Err(EvalError::Overflow);
        }
        Ok(Value { approx: Complex64::new(to_f64(&r), 0.0), exact: Some(r) })
    }

    fn approx(c: Complex64) -> Value {
        Value { exact: None, approx: c }
    }

    /// An inexact result. A float that overflowed from finite operands has lost the value, and
    /// so has one computed from an exact operand beyond f64's range (`\pi \cdot 2^{2000}`).
    fn computed(c: Complex64, operands: &[&Value]) -> Result<Value, EvalError> {
        let finite = |c: Complex64| c.re.is_finite() && c.im.is_finite();
        let overflowed = !finite(c) && !c.re.is_nan() && !c.im.is_nan() && operands.iter().all(|v| finite(v.approx));
        if overflowed || operands.iter().any(|v| v.exact.is_some() && !finite(v.approx)) {
            return Err(EvalError::Overflow);
        }
        Ok(Value::approx(c))
    }
}

/// The nearest f64 (±∞ past its range).
pub(crate) fn to_f64(r: &Rational) -> f64 {
    r.to_f64().unwrap_or(f64::NAN)
}

fn integer(n: i64) -> Rational {
    Rational::from_integer(BigInt::from(n))
}

/// Out of budget: the verdict is "not shown equal".
#[derive(Debug, Clone, PartialEq)]
pub enum EvalError {
    Budget,
    /// A value too large to hold (exactly or as a float): at a sample point of an expression
    /// with variables that point is skipped; a constant expression cannot be compared.
    Overflow,
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

/// Parses a decimal literal ("12", "0.25", "1.5e-3") exactly; `None` past 10,000 digits or an
/// exponent of 10,000.
pub fn parse_decimal(text: &str) -> Option<Rational> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.len() + fraction.len() > 10_000 || exponent.unsigned_abs() > 10_000 {
        return None;
    }
    let digits: BigInt = format!("{whole}{fraction}").parse().ok()?;
    let ten = BigInt::from(10);
    let value = Rational::new(digits, ten.pow(fraction.len() as u32));
    let power = Rational::from_integer(ten.pow(exponent.unsigned_abs()));
    Some(if exponent >= 0 { value * power } else { value / power })
}

/// `x!` as Γ(x + 1): exact products for small integers, Lanczos (g = 7, 9 terms, ~1e-15 relative)
/// elsewhere, so that `\binom{n+1}{2}` equals `\frac{n(n+1)}{2}` at non-integer sample points.
fn gamma_factorial(x: f64) -> f64 {
    if x >= 0.0 && x.fract() == 0.0 && x <= 170.0 {
        return (1..=x as u64).map(|k| k as f64).product();
    }
    if x < 0.0 && x.fract() == 0.0 {
        return f64::NAN; // a pole
    }
    gamma(x + 1.0)
}

fn gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9, 676.520_368_121_885_1, -1_259.139_216_722_402_8, 771.323_428_777_653_1,
        -176.615_029_162_140_6, 12.507_343_278_686_905, -0.138_571_095_265_720_12, 9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx).
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let sum = C[1..].iter().enumerate().fold(C[0], |acc, (i, c)| acc + c / (x + i as f64 + 1.0));
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * sum
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
            Some(r) => Value::exact(r)?,
            // Past parse_decimal's exponent limit: `1e20000` is not infinity.
            None => Value::computed(Complex64::new(text.parse::<f64>().map_err(|_| EvalError::Undefined(text.clone()))?, 0.0), &[])?,
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
            match (&a.exact, &b.exact) {
                (Some(x), Some(y)) => Value::exact(if minus { x - y } else { x + y })?,
                _ => Value::computed(if minus { a.approx - b.approx } else { a.approx + b.approx }, &[&a, &b])?,
            }
        }
        Expr::Mul(a, b) => {
            let (a, b) = (eval(a, budget)?, eval(b, budget)?);
            match (&a.exact, &b.exact) {
                (Some(x), Some(y)) => Value::exact(x * y)?,
                _ => Value::computed(a.approx * b.approx, &[&a, &b])?,
            }
        }
        Expr::Div(a, b) => {
            let (a, b) = (eval(a, budget)?, eval(b, budget)?);
            // An exact divisor decides by its exact value: 10^{-400} is not zero, though its f64 is.
            if b.exact.as_ref().map_or(b.approx.norm() == 0.0, Zero::is_zero) {
                return Err(EvalError::Undefined("division by zero".into()));
            }
            match (&a.exact, &b.exact) {
                (Some(x), Some(y)) => Value::exact(x / y)?,
                _ => Value::computed(a.approx / b.approx, &[&a, &b])?,
            }
        }
        Expr::Pow(a, b) => {
            let (base, exponent) = (eval(a, budget)?, eval(b, budget)?);
            if let (Some(x), Some(n)) = (&base.exact, &exponent.exact) {
                if n.is_integer() && !(x.is_zero() && n.is_negative()) {
                    // The result's size is known before it is computed: |n| · bits(x).
                    // 0, 1 and -1 stay small whatever the power; the denominator 1 adds nothing.
                    let bits = |n: &BigInt| if n.abs().is_one() { 0 } else { n.bits() };
                    let size = bits(x.numer()) + bits(x.denom());
                    let k = n.numer().abs().to_u64().filter(|&k| x.is_zero() || k.saturating_mul(size) <= MAX_EXACT_BITS || k <= u32::MAX as u64 && size == 0);
                    let Some(k) = k.filter(|&k| k <= u32::MAX as u64) else { return Err(EvalError::Overflow) };
                    budget.spend()?;
                    let power = Rational::new(x.numer().pow(k as u32), x.denom().pow(k as u32));
                    return Value::exact(if n.is_negative() { power.recip() } else { power });
                }
            }
            let approx = if base.approx.im == 0.0 && exponent.approx.im == 0.0 && base.approx.re >= 0.0 {
                Complex64::new(base.approx.re.powf(exponent.approx.re), 0.0)
            } else if base.approx.im == 0.0 && exponent.approx.im == 0.0 && exponent.approx.re.fract() == 0.0 {
                Complex64::new(base.approx.re.powf(exponent.approx.re), 0.0)
            } else {
                base.approx.powc(exponent.approx)
            };
            Value::computed(approx, &[&base, &exponent])?
        }
        Expr::Root(index, radicand) => {
            let (n, x) = (eval(index, budget)?, eval(radicand, budget)?);
            if let (Some(n), Some(x)) = (&n.exact, &x.exact) {
                if *n == integer(2) && !x.is_negative() {
                    if let (Some(a), Some(b)) = (exact_sqrt(x.numer()), exact_sqrt(x.denom())) {
                        return Value::exact(Rational::new(a, b));
                    }
                }
            }
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
            Value::computed(approx, &[&n, &x])?
        }
        Expr::Factorial(a) => {
            let a = eval(a, budget)?;
            match &a.exact {
                Some(n) if n.is_integer() && !n.is_negative() => {
                    let n = n.numer().to_u32().filter(|&n| n <= MAX_EXACT_FACTORIAL).ok_or(EvalError::Overflow)?;
                    let mut product = BigInt::one();
                    for k in 2..=n {
                        budget.spend()?;
                        product *= k;
                    }
                    Value::exact(Rational::from_integer(product))?
                }
                _ => Value::computed(Complex64::new(gamma_factorial(a.approx.re), 0.0), &[&a])?,
            }
        }
        Expr::Abs(a) => {
            let a = eval(a, budget)?;
            Value { exact: a.exact.as_ref().map(Signed::abs), approx: Complex64::new(a.approx.norm(), 0.0) }
        }
        Expr::Log(base, x) => {
            let (base, x) = (eval(base, budget)?, eval(x, budget)?);
            Value::computed(x.approx.ln() / base.approx.ln(), &[&base, &x])?
        }
        Expr::Function(name, a) if name == "floor" || name == "ceil" => {
            let a = eval(a, budget)?;
            let floor = name == "floor";
            match &a.exact {
                Some(r) => Value::exact(if floor { r.floor() } else { r.ceil() })?,
                None => Value::approx(Complex64::new(if floor { a.approx.re.floor() } else { a.approx.re.ceil() }, 0.0)),
            }
        }
        Expr::Function(name, a) => {
            let a = eval(a, budget)?;
            let x = a.approx;
            let value = match name.as_str() {
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
            };
            Value::computed(value, &[&a])?
        }
    })
}

fn exact_sqrt(n: &BigInt) -> Option<BigInt> {
    if n.is_negative() {
        return None;
    }
    let root = n.sqrt();
    (&root * &root == *n).then_some(root)
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
