//! Parsing normalised LaTeX answers into expressions and answer structures.
//!
//! The grammar covers what final answers of math problems use: numbers, fractions, radicals,
//! powers, π and e, the usual functions, implicit multiplication, mixed numbers, `\pm`, and
//! around them tuples, intervals, sets, unions, matrices and relations.

use std::fmt;

/// Environments that typeset a matrix; brackets are typesetting, the entries are the value.
const MATRIX_ENVIRONMENTS: &[&str] = &["pmatrix", "bmatrix", "Bmatrix", "matrix", "smallmatrix"];

/// Deeper nesting than this is rejected rather than risking the stack.
const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    Number(String),
    Letter(char),
    Command(String),
    Symbol(char),
    /// `\\` row separator in matrices.
    RowSeparator,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Constant {
    Pi,
    E,
    I,
    Infinity,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A decimal literal as written (exact).
    Number(String),
    Variable(String),
    Constant(Constant),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    /// `a ± b`: both values.
    PlusMinus(Box<Expr>, Box<Expr>),
    Function(String, Box<Expr>),
    /// `log_b(x)`.
    Log(Box<Expr>, Box<Expr>),
    /// `\sqrt[n]{x}`; index 2 for `\sqrt{x}`.
    Root(Box<Expr>, Box<Expr>),
    Factorial(Box<Expr>),
    Abs(Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Relation {
    pub fn flipped(self) -> Relation {
        match self {
            Relation::Lt => Relation::Gt,
            Relation::Le => Relation::Ge,
            Relation::Gt => Relation::Lt,
            Relation::Ge => Relation::Le,
            other => other,
        }
    }
}

/// An answer's shape; the gold answer's shape decides how a prediction is compared.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Expr(Expr),
    /// `(a, b]` and friends: order and brackets matter.
    Tuple { open: char, close: char, items: Vec<Expr> },
    /// `\{a, b\}`, a bare list `a, b`, or a union of intervals: order does not matter.
    Set(Vec<Answer>),
    Relations(Vec<(Expr, Relation, Expr)>),
    Matrix(Vec<Vec<Expr>>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn error<T>(message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(message.into()))
}

pub fn tokenize(input: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = input.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            // Scientific notation written as 1.5e-3.
            if i + 1 < chars.len()
                && (chars[i] == 'e' || chars[i] == 'E')
                && (chars[i + 1].is_ascii_digit()
                    || ((chars[i + 1] == '-' || chars[i + 1] == '+') && chars.get(i + 2).is_some_and(char::is_ascii_digit)))
            {
                i += 2;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            let text: String = chars[start..i].iter().collect();
            if text.matches('.').count() > 1 {
                return error(format!("malformed number `{text}`"));
            }
            tokens.push(Token::Number(text));
        } else if c == '\\' {
            i += 1;
            if i < chars.len() && chars[i] == '\\' {
                tokens.push(Token::RowSeparator);
                i += 1;
            } else if i < chars.len() && chars[i].is_ascii_alphabetic() {
                let start = i;
                while i < chars.len() && chars[i].is_ascii_alphabetic() {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if (name == "begin" || name == "end") && chars.get(i) == Some(&'{') {
                    // `\begin{pmatrix}` is one token: its name is not a product of letters.
                    let close = chars[i..].iter().position(|&c| c == '}').map(|p| i + p);
                    if let Some(close) = close {
                        let environment: String = chars[i + 1..close].iter().collect();
                        tokens.push(Token::Command(format!("{name}:{environment}")));
                        i = close + 1;
                        continue;
                    }
                }
                tokens.push(Token::Command(name));
            } else if i < chars.len() {
                // `\{`, `\}`, `\|` and other escaped symbols.
                tokens.push(Token::Command(chars[i].to_string()));
                i += 1;
            }
        } else if c.is_alphabetic() {
            tokens.push(Token::Letter(c));
            i += 1;
        } else {
            tokens.push(Token::Symbol(c));
            i += 1;
        }
    }
    Ok(tokens)
}

struct Parser<'a> {
    tokens: &'a [Token],
    position: usize,
    depth: usize,
    /// Inside `|…|` a bar closes the group instead of opening another.
    abs_depth: usize,
}

const FUNCTIONS: &[&str] = &[
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "ln", "exp", "log",
];

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a Token> {
        self.tokens.get(self.position)
    }

    fn next(&mut self) -> Option<&'a Token> {
        let token = self.tokens.get(self.position);
        self.position += 1;
        token
    }

    fn eat_symbol(&mut self, symbol: char) -> bool {
        if self.peek() == Some(&Token::Symbol(symbol)) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    fn expect_symbol(&mut self, symbol: char) -> Result<(), ParseError> {
        if self.eat_symbol(symbol) { Ok(()) } else { error(format!("expected `{symbol}`")) }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH { error("nesting too deep") } else { Ok(()) }
    }

    fn expression(&mut self) -> Result<Expr, ParseError> {
        self.enter()?;
        let mut left = self.term()?;
        loop {
            match self.peek() {
                Some(Token::Symbol('+')) => {
                    self.position += 1;
                    left = Expr::Add(Box::new(left), Box::new(self.term()?));
                }
                Some(Token::Symbol('-')) => {
                    self.position += 1;
                    left = Expr::Sub(Box::new(left), Box::new(self.term()?));
                }
                Some(Token::Command(c)) if c == "pm" || c == "mp" => {
                    self.position += 1;
                    left = Expr::PlusMinus(Box::new(left), Box::new(self.term()?));
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(left)
    }

    fn starts_factor(&self) -> bool {
        match self.peek() {
            Some(Token::Number(_)) | Some(Token::Letter(_)) => true,
            Some(Token::Symbol('|')) => self.abs_depth == 0,
            Some(Token::Symbol(c)) => matches!(c, '(' | '{'),
            Some(Token::Command(c)) => !matches!(
                c.as_str(),
                "times" | "cdot" | "div" | "pm" | "mp" | "le" | "ge" | "ne" | "cup" | "cap" | "}" | "{"
                    | "rightarrow" | "approx" | "in" | "ldots" | "text" | "rfloor" | "rceil" | "rvert"
            ),
            _ => false,
        }
    }

    fn term(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.unary()?;
        loop {
            match self.peek() {
                Some(Token::Symbol('*')) | Some(Token::Command(_)) if self.is_times() => {
                    self.position += 1;
                    left = Expr::Mul(Box::new(left), Box::new(self.unary()?));
                }
                Some(Token::Symbol('/')) => {
                    self.position += 1;
                    left = Expr::Div(Box::new(left), Box::new(self.unary()?));
                }
                Some(Token::Command(c)) if c == "div" => {
                    self.position += 1;
                    left = Expr::Div(Box::new(left), Box::new(self.unary()?));
                }
                _ if self.starts_factor() => {
                    // `2\frac{1}{3}` is a mixed number, not a product.
                    let mixed = matches!(&left, Expr::Number(n) if !n.contains('.'))
                        && matches!(self.peek(), Some(Token::Command(c)) if c == "frac");
                    let right = self.power()?;
                    let right_is_plain_fraction = matches!(&right, Expr::Div(a, b)
                        if matches!(**a, Expr::Number(_)) && matches!(**b, Expr::Number(_)));
                    left = if mixed && right_is_plain_fraction {
                        Expr::Add(Box::new(left), Box::new(right))
                    } else {
                        Expr::Mul(Box::new(left), Box::new(right))
                    };
                }
                _ => break,
            }
        }
        Ok(left)
    }

    fn is_times(&self) -> bool {
        match self.peek() {
            Some(Token::Symbol('*')) => true,
            Some(Token::Command(c)) => c == "times" || c == "cdot",
            _ => false,
        }
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        self.enter()?;
        let leading_plus_minus = matches!(self.peek(), Some(Token::Command(c)) if c == "pm");
        let result = if leading_plus_minus {
            // `\pm 3` is both 3 and -3.
            self.position += 1;
            Ok(Expr::PlusMinus(Box::new(Expr::Number("0".into())), Box::new(self.unary()?)))
        } else if self.eat_symbol('-') {
            Ok(Expr::Neg(Box::new(self.unary()?)))
        } else if self.eat_symbol('+') {
            self.unary()
        } else {
            self.power()
        };
        self.depth -= 1;
        result
    }

    fn power(&mut self) -> Result<Expr, ParseError> {
        let base = self.postfix()?;
        if self.eat_symbol('^') {
            self.enter()?;
            let exponent = if self.eat_symbol('-') { Expr::Neg(Box::new(self.exponent()?)) } else { self.exponent()? };
            self.depth -= 1;
            return Ok(Expr::Pow(Box::new(base), Box::new(exponent)));
        }
        Ok(base)
    }

    /// A power's exponent: a braced group or one atom (`x^2y` is `x^2 · y`).
    fn exponent(&mut self) -> Result<Expr, ParseError> {
        if self.peek() == Some(&Token::Symbol('{')) {
            return self.group('{', '}');
        }
        match self.next() {
            // Strict LaTeX reads `2^10` as 2¹·0; answers mean 2¹⁰, so the whole number is taken.
            Some(Token::Number(n)) => Ok(Expr::Number(n.clone())),
            Some(Token::Letter(c)) => Ok(letter(*c)),
            Some(Token::Command(_)) => {
                self.position -= 1;
                self.postfix()
            }
            _ => error("missing exponent"),
        }
    }

    fn postfix(&mut self) -> Result<Expr, ParseError> {
        let mut expr = self.primary()?;
        while self.eat_symbol('!') {
            expr = Expr::Factorial(Box::new(expr));
        }
        Ok(expr)
    }

    /// The raw text of a subscript: one token, or a braced group.
    fn subscript_text(&mut self) -> Result<String, ParseError> {
        let spell = |token: &Token| match token {
            Token::Number(n) => n.clone(),
            Token::Letter(c) => c.to_string(),
            Token::Symbol(c) => c.to_string(),
            Token::Command(c) => format!("\\{c}"),
            Token::RowSeparator => "\\\\".into(),
        };
        if !self.eat_symbol('{') {
            return self.next().map(spell).ok_or_else(|| ParseError("missing subscript".into()));
        }
        let mut text = String::new();
        let mut depth = 1;
        while let Some(token) = self.next() {
            match token {
                Token::Symbol('{') => depth += 1,
                Token::Symbol('}') => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(text);
                    }
                }
                _ => {}
            }
            text.push_str(&spell(token));
        }
        error("unclosed subscript")
    }

    fn group(&mut self, open: char, close: char) -> Result<Expr, ParseError> {
        self.expect_symbol(open)?;
        let inner = self.expression()?;
        self.expect_symbol(close)?;
        Ok(inner)
    }

    fn braced(&mut self) -> Result<Expr, ParseError> {
        if self.peek() == Some(&Token::Symbol('{')) { self.group('{', '}') } else { self.power() }
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        self.enter()?;
        let token = self.next().cloned();
        let result = match token {
            Some(Token::Number(n)) => Ok(Expr::Number(n)),
            Some(Token::Letter(c)) => {
                if self.eat_symbol('_') {
                    // `t_1`, `u_n`, `t_{n-1}`: a subscripted name is one variable.
                    let subscript = self.subscript_text()?;
                    Ok(Expr::Variable(format!("{c}_{subscript}")))
                } else {
                    Ok(letter(c))
                }
            }
            Some(Token::Symbol('(')) => {
                let inner = self.expression()?;
                self.expect_symbol(')')?;
                Ok(inner)
            }
            Some(Token::Symbol('{')) => {
                let inner = self.expression()?;
                self.expect_symbol('}')?;
                Ok(inner)
            }
            Some(Token::Symbol('|')) => {
                self.abs_depth += 1;
                let inner = self.expression();
                self.abs_depth -= 1;
                let inner = inner?;
                self.expect_symbol('|')?;
                Ok(Expr::Abs(Box::new(inner)))
            }
            Some(Token::Command(command)) => self.command(&command),
            Some(other) => error(format!("unexpected {other:?}")),
            None => error("unexpected end"),
        };
        self.depth -= 1;
        result
    }

    fn command(&mut self, command: &str) -> Result<Expr, ParseError> {
        match command {
            "frac" => {
                let numerator = self.braced()?;
                let denominator = self.braced()?;
                Ok(Expr::Div(Box::new(numerator), Box::new(denominator)))
            }
            "sqrt" => {
                let index = if self.eat_symbol('[') {
                    let index = self.expression()?;
                    self.expect_symbol(']')?;
                    index
                } else {
                    Expr::Number("2".into())
                };
                Ok(Expr::Root(Box::new(index), Box::new(self.braced()?)))
            }
            "binom" | "dbinom" | "tbinom" => {
                let n = self.braced()?;
                let k = self.braced()?;
                Ok(binomial(n, k))
            }
            "lfloor" | "lceil" => {
                let (close, name) = if command == "lfloor" { ("rfloor", "floor") } else { ("rceil", "ceil") };
                let inner = self.expression()?;
                match self.next() {
                    Some(Token::Command(c)) if c == close => Ok(Expr::Function(name.into(), Box::new(inner))),
                    _ => error(format!("unclosed \\{command}")),
                }
            }
            "pi" => Ok(Expr::Constant(Constant::Pi)),
            "infty" | "infinity" => Ok(Expr::Constant(Constant::Infinity)),
            "mathrm" | "mathit" | "operatorname" => self.braced(),
            "lvert" | "vert" => {
                let inner = self.expression()?;
                match self.next() {
                    Some(Token::Command(c)) if c == "rvert" || c == "vert" => Ok(Expr::Abs(Box::new(inner))),
                    _ => error("unclosed \\lvert"),
                }
            }
            name if FUNCTIONS.contains(&name) => {
                // `\sin^2 x` is (sin x)².
                let power = if self.eat_symbol('^') { Some(self.exponent()?) } else { None };
                let base = if name == "log" && self.eat_symbol('_') { Some(self.exponent()?) } else { None };
                let argument = if matches!(self.peek(), Some(Token::Symbol('(' | '{'))) {
                    self.primary()?
                } else {
                    // `\sin 2x` is sin(2x): the argument runs over a product of numbers and letters.
                    let mut argument = self.power()?;
                    while matches!(self.peek(), Some(Token::Number(_) | Token::Letter(_))) {
                        argument = Expr::Mul(Box::new(argument), Box::new(self.power()?));
                    }
                    argument
                };
                let applied = match base {
                    Some(base) => Expr::Log(Box::new(base), Box::new(argument)),
                    None => Expr::Function(name.to_string(), Box::new(argument)),
                };
                Ok(match power {
                    Some(power) => Expr::Pow(Box::new(applied), Box::new(power)),
                    None => applied,
                })
            }
            greek if GREEK.contains(&greek) => Ok(Expr::Variable(greek.to_string())),
            other => error(format!("unsupported command \\{other}")),
        }
    }
}

const GREEK: &[&str] = &[
    "alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "sigma", "phi", "omega", "tau", "rho", "epsilon",
];

/// `n! / (k! (n - k)!)`: exact while the factorials are.
fn binomial(n: Expr, k: Expr) -> Expr {
    let rest = Expr::Sub(Box::new(n.clone()), Box::new(k.clone()));
    let denominator = Expr::Mul(Box::new(Expr::Factorial(Box::new(k))), Box::new(Expr::Factorial(Box::new(rest))));
    Expr::Div(Box::new(Expr::Factorial(Box::new(n))), Box::new(denominator))
}

fn letter(c: char) -> Expr {
    match c {
        'e' => Expr::Constant(Constant::E),
        'i' => Expr::Constant(Constant::I),
        other => Expr::Variable(other.to_string()),
    }
}

/// Parses a whole expression from tokens.
pub fn parse_expr(tokens: &[Token]) -> Result<Expr, ParseError> {
    if tokens.is_empty() {
        return error("empty");
    }
    let mut parser = Parser { tokens, position: 0, depth: 0, abs_depth: 0 };
    let expr = parser.expression()?;
    if parser.position < tokens.len() {
        return error(format!("unexpected {:?}", tokens[parser.position]));
    }
    Ok(expr)
}

/// Splits tokens at top-level occurrences of `is_separator` (outside any brackets).
fn split_top_level(tokens: &[Token], is_separator: impl Fn(&Token) -> bool) -> Vec<&[Token]> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, token) in tokens.iter().enumerate() {
        match token {
            Token::Symbol('(' | '[' | '{') => depth += 1,
            Token::Symbol(')' | ']' | '}') => depth -= 1,
            Token::Command(c) if c == "{" || c.starts_with("begin:") => depth += 1,
            Token::Command(c) if c == "}" || c.starts_with("end:") => depth -= 1,
            _ => {}
        }
        if depth == 0 && is_separator(token) {
            parts.push(&tokens[start..i]);
            start = i + 1;
        }
    }
    parts.push(&tokens[start..]);
    parts
}

fn relation_of(token: &Token) -> Option<Relation> {
    match token {
        Token::Symbol('=') => Some(Relation::Eq),
        Token::Symbol('<') => Some(Relation::Lt),
        Token::Symbol('>') => Some(Relation::Gt),
        Token::Command(c) if c == "le" || c == "leqslant" => Some(Relation::Le),
        Token::Command(c) if c == "ge" || c == "geqslant" => Some(Relation::Ge),
        Token::Command(c) if c == "ne" => Some(Relation::Ne),
        _ => None,
    }
}

/// Is the whole token list wrapped in one matching pair `open … close`?
fn wrapped(tokens: &[Token], open: &Token, close: &Token) -> bool {
    if tokens.len() < 2 || &tokens[0] != open || tokens.last() != Some(close) {
        return false;
    }
    split_top_level(&tokens[1..tokens.len() - 1], |_| false).len() == 1
        && balanced(&tokens[1..tokens.len() - 1])
}

fn balanced(tokens: &[Token]) -> bool {
    let mut depth = 0i32;
    for token in tokens {
        match token {
            Token::Symbol('(' | '[' | '{') => depth += 1,
            Token::Symbol(')' | ']' | '}') => depth -= 1,
            Token::Command(c) if c == "{" => depth += 1,
            Token::Command(c) if c == "}" => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

fn interval_bracket(token: &Token) -> Option<char> {
    match token {
        Token::Symbol(c @ ('(' | '[' | ')' | ']')) => Some(*c),
        _ => None,
    }
}

/// Parses a normalised answer into its structure.
pub fn parse_answer(text: &str) -> Result<Answer, ParseError> {
    let tokens = tokenize(text)?;
    parse_answer_tokens(&tokens, 0)
}

fn parse_answer_tokens(tokens: &[Token], depth: usize) -> Result<Answer, ParseError> {
    if depth > 8 {
        return error("nesting too deep");
    }
    if tokens.is_empty() {
        return error("empty answer");
    }
    // Matrices.
    if let (Some(Token::Command(begin)), Some(Token::Command(end))) = (tokens.first(), tokens.last()) {
        if let (Some(kind), Some(end_kind)) = (begin.strip_prefix("begin:"), end.strip_prefix("end:")) {
            // A determinant (`vmatrix`) or a case split is a different thing with the same cells.
            if kind != end_kind || !MATRIX_ENVIRONMENTS.contains(&kind) {
                return error(format!("unsupported environment {kind}"));
            }
            return parse_matrix(tokens);
        }
    }
    // Unions of intervals and sets.
    let union = split_top_level(tokens, |t| matches!(t, Token::Command(c) if c == "cup"));
    if union.len() > 1 {
        return Ok(Answer::Set(union.into_iter().map(|part| parse_answer_tokens(part, depth + 1)).collect::<Result<_, _>>()?));
    }
    // `\{a, b\}`.
    if wrapped(tokens, &Token::Command("{".into()), &Token::Command("}".into())) {
        let inner = &tokens[1..tokens.len() - 1];
        if inner.is_empty() {
            return Ok(Answer::Set(Vec::new()));
        }
        let items = split_top_level(inner, |t| *t == Token::Symbol(','));
        return Ok(Answer::Set(items.into_iter().map(|item| parse_answer_tokens(item, depth + 1)).collect::<Result<_, _>>()?));
    }
    // Tuples and intervals: `(a, b)`, `[a, b)`, …
    if tokens.len() >= 2 {
        if let (Some(open), Some(close)) = (interval_bracket(&tokens[0]), interval_bracket(&tokens[tokens.len() - 1])) {
            let inner = &tokens[1..tokens.len() - 1];
            let items = split_top_level(inner, |t| *t == Token::Symbol(','));
            if matches!(open, '(' | '[') && matches!(close, ')' | ']') && items.len() > 1 && balanced(inner) {
                return Ok(Answer::Tuple {
                    open,
                    close,
                    items: items.into_iter().map(parse_expr).collect::<Result<_, _>>()?,
                });
            }
        }
    }
    // A bare list `a, b` (or `a \text{ and } b` after normalisation: "a and b").
    let items = split_top_level(tokens, |t| *t == Token::Symbol(',') || *t == Token::Symbol(';'));
    if items.len() > 1 {
        return Ok(Answer::Set(
            items.into_iter().filter(|i| !i.is_empty()).map(|item| parse_answer_tokens(item, depth + 1)).collect::<Result<_, _>>()?,
        ));
    }
    // Relations, possibly chained (`1 < x \le 3`).
    let parts = split_top_level(tokens, |t| relation_of(t).is_some());
    if parts.len() > 1 {
        let mut operators = Vec::new();
        let mut d = 0i32;
        for token in tokens {
            match token {
                Token::Symbol('(' | '[' | '{') => d += 1,
                Token::Symbol(')' | ']' | '}') => d -= 1,
                _ => {}
            }
            if d == 0 {
                if let Some(relation) = relation_of(token) {
                    operators.push(relation);
                }
            }
        }
        let exprs: Vec<Expr> = parts.into_iter().map(parse_expr).collect::<Result<_, _>>()?;
        let relations = exprs.windows(2).zip(operators).map(|(pair, op)| (pair[0].clone(), op, pair[1].clone())).collect();
        return Ok(Answer::Relations(relations));
    }
    Ok(Answer::Expr(parse_expr(tokens)?))
}

fn parse_matrix(tokens: &[Token]) -> Result<Answer, ParseError> {
    // `\begin{pmatrix} … \end{pmatrix}`, the environment names being single tokens.
    let body = &tokens[1..tokens.len() - 1];
    let rows = split_top_level(body, |t| *t == Token::RowSeparator);
    let mut matrix = Vec::new();
    for row in rows {
        if row.is_empty() {
            continue;
        }
        let cells = split_top_level(row, |t| *t == Token::Symbol('&'));
        matrix.push(cells.into_iter().map(parse_expr).collect::<Result<Vec<_>, _>>()?);
    }
    if matrix.is_empty() {
        return error("empty matrix");
    }
    Ok(Answer::Matrix(matrix))
}
