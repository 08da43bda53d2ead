//! Training and evaluation data: rows of JSONL / Parquet files, tokenized traces, packing and
//! micro-batches.

pub mod batch;
pub mod cache;
pub mod packing;
pub mod records;
pub mod traces;
