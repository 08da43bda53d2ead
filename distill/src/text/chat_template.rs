//! Chat templates rendered the way `transformers.apply_chat_template` renders them.
//!
//! transformers runs the template in a Jinja2 sandbox with `trim_blocks`, `lstrip_blocks` and
//! the loop-controls extension, adds `raise_exception` and `strftime_now`, and replaces
//! `tojson` with Python's `json.dumps(ensure_ascii=False)`. minijinja with its Python
//! compatibility layer (`.strip()`, `.split()`, …) gives the same language; the rest is
//! set up here so that the bytes come out equal.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template does not compile: {0:#}")]
    Compile(#[source] Error),
    #[error("chat template failed: {0:#}")]
    Render(#[source] Error),
}

/// One chat message: `{role, content}` as in HF and the OpenAI API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", python_tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(TemplateError::Compile)?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages`; `special_tokens` are the template variables transformers passes from
    /// the tokenizer (`bos_token`, `eos_token`, …), omitted when the tokenizer has none.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special_tokens: &[(&str, &str)],
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(TemplateError::Render)?;
        let mut context: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        for (name, token) in special_tokens {
            context.push((name, Value::from(*token)));
        }
        let context: Value = context.into_iter().collect();
        template.render(context).map_err(TemplateError::Render)
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<Value, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    // chrono reports a bad format specifier as a fmt error rather than panicking.
    write!(out, "{}", chrono::Local::now().format(&format))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}")))?;
    Ok(Value::from(out))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn python_tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = Vec::new();
    let result = match indent {
        Some(width) => {
            let indent = " ".repeat(width);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            json.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))
        }
        None => json.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonCompact)),
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    // serde_json writes valid UTF-8.
    Ok(Value::from_safe_string(String::from_utf8(out).unwrap_or_default()))
}

/// Python's default `json.dumps` separators: `", "` between items and `": "` after keys.
struct PythonCompact;

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_jinja_semantics() {
        let template = ChatTemplate::new(
            "{% for m in messages %}{% if loop.index0 > 1 %}{% break %}{% endif %}\
             {{ m.role.upper() }}:{{ m.content.strip() }}|{% endfor %}\
             {{ {'a': [1, 'é']} | tojson }}{% if add_generation_prompt %}{{ bos_token }}{% endif %}",
        )
        .unwrap();
        let messages = [Message::new("user", " hi "), Message::new("assistant", "yo"), Message::new("user", "x")];
        let text = template.render(&messages, true, &[("bos_token", "<s>")]).unwrap();
        assert_eq!(text, "USER:hi|ASSISTANT:yo|{\"a\": [1, \"é\"]}<s>");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let template = ChatTemplate::new("{{ raise_exception('only user and assistant roles') }}").unwrap();
        let error = template.render(&[], false, &[]).unwrap_err().to_string();
        assert!(error.contains("only user and assistant roles"), "{error}");
    }

    #[test]
    fn trims_blocks_like_transformers() {
        let template = ChatTemplate::new("{% if true %}\n  a\n{% endif %}\nb\n").unwrap();
        assert_eq!(template.render(&[], false, &[]).unwrap(), "  a\nb");
    }
}
