//! The `distill` library: Qwen2 / Llama-3 students of the DeepSeek-R1 distillation in burn.
//!
//! The flow: an HF checkpoint folder ([`pretrained`]) gives a [`model::Model`] and a
//! [`text::Tokenizer`]; [`data`] reads JSONL / Parquet rows; [`eval`] scores them and
//! [`generate`] samples from the model.

pub use burn;

pub mod benchmark;
pub mod data;
pub mod device;
pub mod eval;
pub mod export;
pub mod generate;
pub mod info;
pub mod memory;
pub mod plan;
pub mod plot;
pub mod model;
pub mod ops;
pub mod pretrained;
pub mod staging;
pub mod student;
pub mod tensor_file;
pub mod text;
pub mod threads;
pub mod train;
