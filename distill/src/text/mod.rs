//! Tokenizers and chat templates of HF checkpoints.

pub mod chat_template;
pub mod tokenizer;

pub use chat_template::{ChatTemplate, Message, TemplateError};
pub use tokenizer::{Tokenizer, TokenizerError};
